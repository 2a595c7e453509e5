"""Where the model looks: `fedmammo predict ... --heatmaps DIR`.

For each scored exam and each of its views: a Grad-CAM map of the malignancy logit, the box of its most
salient region and its peak, in the view's DICOM file's stored pixel grid (rows and columns as a viewer
displays the file), and a PNG of the view as displayed (after its VOI) with the map blended in and the box
drawn.

Grad-CAM (Selvaraju et al. 2017) on the trunk's last feature map, the one `DualViewDenseNet.view_features`
pools (the layer Grad-CAM is usually given for a DenseNet): each channel weighted by the mean gradient of
the logit over it, summed, negative parts cut. No new dependency: a forward hook and `torch.autograd.grad`.
As the heads are linear on the pooled features, the map is close to the class activation map (Zhou et al.
2016), each location's share of the logit; in a bilateral model a contralateral view's share comes through
the [ipsi − contra] features. The map is as coarse as that feature map (1/32 of the model's input: 2×1
cells at the demo's 64×48 views, 8×6 at 256×192) and is upsampled bilinearly. A view that only lowers the
score has an empty map, and no box.

The map is taken back to the file's pixels through the view's `common.preprocess.Geometry` (flip, crop to
the breast, resize), recorded by preprocessing the file again exactly as it was for the score. Everything
stays at the hospital: this is a client-side command, and nothing is sent anywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from client.check import VIEW_NAMES, file_names, write_png
from client.device import Runtime
from client.prepare import PreparedSite, Source
from common.config import Config
from common.dicom import DicomError, read_view
from common.preprocess import Box, Geometry, preprocess, resize

THRESHOLD = 0.5
"""The salient region: the connected part of the map at or above this share of its peak, around the peak."""
PNG_SIDE = 2048
"""Longest side of an overlay PNG: larger views are shown smaller (a full-field view is ~4000 pixels)."""
OPACITY = 0.5
"""Opacity of the map where it peaks; it fades out with the map."""
BOX_COLOUR = (0.0, 1.0, 0.0)


def grad_cam(model: nn.Module, views: Tensor, layer: str = "features") -> Tensor:
    """Grad-CAM of the malignancy logit: views (B, V, H, W) → maps (B, V, H, W) ≥ 0, upsampled bilinearly.

    `layer`: the module whose output is the feature map, `features` (the trunk's last map, its final
    BatchNorm's output, which `view_features` passes through a ReLU and pools) or any block of it (e.g.
    `features.denseblock3`: twice as fine, less specific to the heads). In eval mode each exam's logit
    depends on its own views only, so one backward pass serves the batch."""
    module = model.get_submodule(layer)
    maps: list[Tensor] = []
    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(lambda _module, _inputs, output: maps.append(output))
    try:
        with torch.enable_grad():
            logits = model(views.float().detach().requires_grad_())["malignancy"]
            grads = torch.autograd.grad(logits.sum(), maps)
    finally:
        handle.remove()
        model.train(was_training)
    cams = torch.stack([F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
                        for a, g in zip(maps, grads, strict=True)], dim=1)
    return F.interpolate(cams.detach(), size=views.shape[-2:], mode="bilinear", align_corners=False)


def salient(cam: np.ndarray) -> tuple[Box, tuple[float, float]] | None:
    """The box (pixel edges) of the map's connected region at or above `THRESHOLD` of its peak that holds
    the peak, and the peak's centre (row, column, in edge coordinates); None for an empty map. Where the
    maximum is a plateau (a map one cell wide is constant across the view), the peak is its pixel nearest
    the plateau's centroid, not its first pixel (which would be the chest wall's)."""
    top = float(cam.max())
    if not top > 0:
        return None
    rows, cols = np.nonzero(cam >= top * (1 - 1e-6))
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    peak = rows[nearest], cols[nearest]
    regions, _ = ndimage.label(cam >= THRESHOLD * top)
    rows, cols = np.nonzero(regions == regions[peak])
    return ((float(rows.min()), float(rows.max() + 1), float(cols.min()), float(cols.max() + 1)),
            (peak[0] + 0.5, peak[1] + 0.5))


def to_pixels(geometry: Geometry, box: Box, peak: tuple[float, float]
              ) -> tuple[dict[str, int], dict[str, float]]:
    """A model-input box and peak (`salient`) in the stored image: the box as the whole pixels it covers,
    {top, bottom, left, right}, half-open (rows top … bottom − 1); the peak as pixel indices, {row, col}.
    Edges are rounded outwards, past float rounding error (1e-6 pixel)."""
    top, bottom, left, right = geometry.to_source(box)
    row, _, col, _ = geometry.to_source((peak[0], peak[0], peak[1], peak[1]))
    pixels = {"top": math.floor(top + 1e-6), "bottom": math.ceil(bottom - 1e-6),
              "left": math.floor(left + 1e-6), "right": math.ceil(right - 1e-6)}
    return pixels, {"row": round(row - 0.5, 2), "col": round(col - 0.5, 2)}


def on_source(cam: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A model-input map on the stored image's pixel grid: its part over the crop resized onto the crop
    (the same bilinear mapping as `Geometry.to_source`), zero elsewhere."""
    ptop, pbottom, pleft, pright = geometry.placed
    top, bottom, left, right = geometry.crop
    canonical = np.zeros(geometry.shape, np.float32)
    canonical[top:bottom, left:right] = resize(cam[ptop:pbottom, pleft:pright], (bottom - top, right - left))
    return canonical[:, ::-1] if geometry.flipped else canonical


def overlay(grey: np.ndarray, heat: np.ndarray, box: dict[str, int] | None) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: the displayed view with `heat` (0–1) blended in as a colour map, fading
    out where it is low, and `box` outlined; at most `PNG_SIDE` pixels on its longest side."""
    from matplotlib import colormaps  # only --heatmaps needs it

    scale = min(1.0, PNG_SIDE / max(grey.shape))
    if scale < 1.0:
        size = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
        grey, heat = resize(grey, size), resize(heat, size)
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    rgb = (1 - OPACITY * heat) * grey[..., None] + OPACITY * heat * colormaps["jet"](heat[..., 0])[..., :3]
    if box is not None:
        rows, cols = grey.shape
        top, left = min(rows - 1, int(box["top"] * scale)), min(cols - 1, int(box["left"] * scale))
        bottom = max(top + 1, math.ceil(box["bottom"] * scale))
        right = max(left + 1, math.ceil(box["right"] * scale))
        width = max(1, round(max(rows, cols) / 300))
        for r0, r1, c0, c1 in ((top, top + width, left, right), (bottom - width, bottom, left, right),
                               (top, bottom, left, left + width), (top, bottom, right - width, right)):
            rgb[max(r0, 0):r1, max(c0, 0):c1] = BOX_COLOUR
    return rgb


def view_record(source: Source, cam: np.ndarray, size: tuple[int, int], exam_peak: float, png: Path | None
                ) -> dict[str, Any]:
    """One view's entry of the predictions' JSON (writing its overlay to `png` when given): its file, the
    box and peak of its map in the file's pixels (None when the map is empty), and its peak's share of the
    exam's highest (which view drives the score). Raises ValueError when the file cannot be read again."""
    try:
        view = read_view(source.path, source.listed)
    except DicomError as exc:  # changed or removed since it was scored
        raise ValueError(f"{exc.path}: cannot be read again for its heatmap: {exc.reason}") from None
    _, geometry = preprocess(view.pixels, size, view.flipped)
    found = salient(np.where(_inside(geometry, cam.shape), cam, 0.0))
    box, peak = to_pixels(geometry, *found) if found else (None, None)
    share = cam / exam_peak if exam_peak > 0 else cam
    if png is not None:
        grey = view.pixels[:, ::-1] if view.flipped else view.pixels
        write_png(png, overlay(grey, on_source(share, geometry), box))
    return {"file": str(source.path), "box": box, "peak": peak, "relative_peak": round(float(share.max()), 4)}


def _inside(geometry: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    """The model input's pixels that hold the image, not the padding."""
    top, bottom, left, right = geometry.placed
    inside = np.zeros(shape, bool)
    inside[top:bottom, left:right] = True
    return inside


def heatmaps(model: nn.Module, site: PreparedSite, config: Config, runtime: Runtime,
             out: Path | None) -> list[list[dict[str, Any]]]:
    """Each exam's view records (`view_record`), writing `out/<name>_<VIEW>.png` when `out` is given (the
    names `fedmammo check --views` gives). Raises ValueError when the site does not know its files (one
    built from arrays) or a file can no longer be read."""
    if len(site.sources) != len(site.exam_ids):
        raise ValueError(f"{site.name}: the views' DICOM files are not known, so no heatmap can be drawn")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    names = file_names(site.exam_ids)
    records: list[list[dict[str, Any]]] = []
    runtime.place(model)
    for start in range(0, len(site.exam_ids), config.train.batch_size):
        indices = range(start, min(start + config.train.batch_size, len(site.exam_ids)))
        views = torch.from_numpy(np.stack([site.read(i) for i in indices])).to(runtime.device)
        for index, cams in zip(indices, grad_cam(model, views).cpu().numpy(), strict=True):
            peak = float(cams.max())
            records.append([
                {"view": view, **view_record(source, cam, config.data.image_size, peak,
                                             out and out / f"{names[index]}_{view}.png")}
                for view, source, cam in zip(VIEW_NAMES, site.sources[index], cams, strict=False)
            ])
    return records
