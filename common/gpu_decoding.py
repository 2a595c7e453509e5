"""JPEG 2000, HTJ2K and JPEG (Lossless) pixel data decoded on the GPU by NVIDIA nvImageCodec, the optional
extra `gpu-decode`, through the pydicom decoder plugin that nvImageCodec itself ships.

The first pass over a site decodes every file, and JPEG 2000 costs ~2.5 CPU-s per 3328×2560 view with
openjpeg (bench/RESULTS.md). Registered, the plugin comes first in pydicom's list for those transfer
syntaxes; when it fails on a frame, pydicom goes on to the next plugin (pylibjpeg, gdcm, pillow), so a file
the GPU codec cannot read is still decoded on the CPU. The codecs are lossless, so the pixels are the CPU
decoder's (tested where a GPU exists).
"""

from __future__ import annotations

import importlib.util


def unavailable() -> str | None:
    """Why nvImageCodec cannot decode in this environment, or None when it can."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.nvimgcodec") is None:
        return "nvImageCodec is not installed (pip install 'fedmammo[gpu-decode]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def use_gpu(mode: str) -> bool:
    """Whether decoding goes to the GPU under the `[data] gpu_decode` setting `mode` (auto, on, off).

    Raises ValueError for `on` where the GPU decoder cannot run, saying why.
    """
    if mode == "off":
        return False
    reason = unavailable()
    if reason and mode == "on":
        raise ValueError(f'[data] gpu_decode = "on", but {reason}; set it to "auto" or "off"')
    return reason is None


def register() -> None:
    """Put nvImageCodec's plugin first among this process's pydicom decoders (again: no effect)."""
    from nvidia.nvimgcodec.tools.dicom import pydicom_plugin

    if not pydicom_plugin.register():
        raise RuntimeError("nvImageCodec's pydicom plugin could not be registered")

