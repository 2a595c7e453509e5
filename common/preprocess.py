"""One view's pixels made into a model input: cropped to the breast, resized with its aspect kept, padded.

Input and output follow the canonical orientation of `common.dicom`: chest wall at column 0, higher =
denser, values in [0, 1]. The breast is found on a strided copy of the image at most `MASK_SIDE` pixels
high and wide: a mask needs no anti-aliasing, and this keeps it ~100× cheaper than the full-size image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

MASK_SIDE = 256
EDGE_STRIP = 0.02
"""Width of the strip along the left and right image edges, as a fraction of the width, where the breast
is looked for: it touches the edge on the chest-wall side only."""
BACKGROUND_TAIL = 0.05
SIDE_MARGIN = 0.1
"""How much more of the image height the breast must cover along one edge than along the other for the
pixels to tell the chest-wall side."""


def background_threshold(values: np.ndarray, bins: int = 128) -> float:
    """The grey level below which lies the background: where its histogram peak has fallen to
    `BACKGROUND_TAIL` of its height.

    The background peak is the highest bin below Otsu's threshold (which splits background + fat from
    dense tissue, or background from breast). Thresholding at the peak's tail, not at Otsu's threshold,
    keeps the fat and the thin, dark periphery near the skin line inside the breast.
    """
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight, mass = np.cumsum(hist), np.cumsum(hist * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mass[-1] * weight - weight[-1] * mass) ** 2 / (weight * (weight[-1] - weight))
    otsu = int(np.nanargmax(between[:-1])) + 1
    peak = int(np.argmax(hist[:otsu]))
    fallen = np.flatnonzero(hist[peak:otsu] < BACKGROUND_TAIL * hist[peak])
    return float(edges[peak + (fallen[0] if fallen.size else otsu - peak)])


def breast_mask(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """The breast on a coarse grid: the largest connected region brighter than the background.

    Returns the boolean mask and the stride it was computed at (mask pixel (i, j) is image pixel
    (i·stride, j·stride)). Keeping the largest component drops burned-in markers and labels.
    """
    stride = max(1, math.ceil(max(pixels.shape) / MASK_SIDE))
    small = np.asarray(pixels[::stride, ::stride], dtype=np.float32)
    if small.max() <= small.min():
        return np.zeros(small.shape, dtype=bool), stride
    components, count = ndimage.label(small > background_threshold(small))
    if count == 0:
        return np.zeros(small.shape, dtype=bool), stride
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax()), stride


def chest_wall_side(pixels: np.ndarray) -> str | None:
    """'left' or 'right': the image edge the breast touches (the chest wall); None when unclear."""
    mask, _ = breast_mask(pixels)
    strip = max(1, round(mask.shape[1] * EDGE_STRIP))
    left = float(mask[:, :strip].any(axis=1).mean())
    right = float(mask[:, -strip:].any(axis=1).mean())
    if abs(left - right) < SIDE_MARGIN:
        return None
    return "left" if left > right else "right"


def crop_to_breast(pixels: np.ndarray) -> np.ndarray:
    """The bounding box of the breast (a view, no copy); the whole image when no breast is found."""
    mask, stride = breast_mask(pixels)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return pixels
    # A mask pixel stands for a stride×stride block: extend by one block so the skin line is not cut.
    top, bottom = max(0, (rows[0] - 1) * stride), min(pixels.shape[0], (rows[-1] + 2) * stride)
    left, right = max(0, (cols[0] - 1) * stride), min(pixels.shape[1], (cols[-1] + 2) * stride)
    return pixels[top:bottom, left:right]


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to `size` (height, width), anti-aliased when shrinking (torch's triangle filter)."""
    import torch  # ~2.5 s to import: scanning headers and reading labels must not pay for it
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].numpy()


def fit(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize with the aspect ratio kept to fit inside `size`, then pad with 0 (background) to `size`:
    left-aligned, so the chest wall stays at column 0, and centred vertically."""
    height, width = size
    scale = min(height / pixels.shape[0], width / pixels.shape[1])
    inner = (min(height, max(1, round(pixels.shape[0] * scale))),
             min(width, max(1, round(pixels.shape[1] * scale))))
    out = np.zeros(size, dtype=np.float32)
    top = (height - inner[0]) // 2
    out[top:top + inner[0], :inner[1]] = resize(pixels, inner)
    return out


def preprocess_view(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A canonically oriented view (`common.dicom.View.pixels`) as model input: float32 (H, W) in [0, 1]."""
    return np.clip(fit(crop_to_breast(pixels), size), 0.0, 1.0)
