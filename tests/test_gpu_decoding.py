"""JPEG 2000 / JPEG Lossless decoded by nvImageCodec on the GPU (`common.gpu_decoding`): chosen only where it
can run, the same pixels as the CPU codecs, and the CPU codecs taking over wherever it fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dicom_factory import dcmtk_jpeg_lossless, mg_dataset, phantom, save, to_stored
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000Lossless

from client.prepare import decode_files, prepare_site
from common import gpu_decoding
from common.config import Config

nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="the gpu-decode extra is not installed")
from nvidia.nvimgcodec.tools.dicom import pydicom_plugin  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine without a CUDA device")


@pytest.fixture
def compressed(tmp_path: Path) -> list[Path]:
    """A 12-bit view as JPEG 2000 lossless and, where dcmtk is installed, JPEG Lossless SV1."""
    stored = to_stored(phantom(96, 72, seed=3), 12)
    paths = [save(mg_dataset(stored, bits=12, window=(2048, 3600)), tmp_path / "j2k.dcm", JPEG2000Lossless)]
    if shutil.which("dcmcjpeg"):
        plain = save(mg_dataset(stored, bits=12, window=(2048, 3600)), tmp_path / "plain.dcm")
        paths.append(dcmtk_jpeg_lossless(plain, tmp_path / "sv1.dcm"))
    return paths


@pytest.fixture
def registered():
    """The plugin in this process's pydicom, taken out again afterwards (pydicom's registry is global)."""
    gpu_decoding.register()
    yield
    pydicom_plugin.unregister()


@no_gpu
def test_without_a_gpu_auto_decodes_on_the_cpu_and_on_is_refused(compressed: list[Path]) -> None:
    assert "CUDA" in gpu_decoding.unavailable()
    assert not gpu_decoding.use_gpu("auto") and not gpu_decoding.use_gpu("off")
    config = Config()
    config.data.gpu_decode = "on"
    with pytest.raises(ValueError, match=r'gpu_decode = "on", but no CUDA device is visible'):
        prepare_site(compressed[0].parent, config, progress=False)


def test_a_frame_the_gpu_codec_cannot_decode_falls_back_to_the_cpu_codecs(compressed: list[Path]) -> None:
    """Decoding workers with the plugin first; where it fails (here: no GPU, or a frame it rejects), pydicom
    goes on to its own plugins, and the views equal those decoded without it."""
    without = decode_files(compressed, (64, 48), 1, 60.0)
    with_plugin = decode_files(compressed, (64, 48), 1, 60.0, gpu=True)
    for path in compressed:
        assert not isinstance(without[path], str), without[path]
        assert with_plugin[path][0] == without[path][0]
        np.testing.assert_array_equal(with_plugin[path][1], without[path][1], err_msg=path.name)


@gpu
def test_the_gpu_decodes_the_same_pixels_as_the_cpu_codecs(compressed: list[Path], registered: None) -> None:
    for path in compressed:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        on_gpu = pixel_array(path, decoding_plugin=pydicom_plugin.NVIMGCODEC_PLUGIN_LABEL)
        on_cpu = pixel_array(path, decoding_plugin="pylibjpeg")
        assert on_gpu.dtype == on_cpu.dtype, syntax.name
        np.testing.assert_array_equal(on_gpu, on_cpu, err_msg=syntax.name)
    assert gpu_decoding.use_gpu("on")
