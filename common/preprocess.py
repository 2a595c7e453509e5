"""One view's pixels made into a model input: cropped to the breast, resized with its aspect kept, padded,
its grey levels harmonised.

Input and output follow the canonical orientation of `common.dicom`: chest wall at column 0, higher =
denser, values in [0, 1]. The breast is found on a strided copy of the image at most `MASK_SIDE` pixels
high and wide: a mask needs no anti-aliasing, and this keeps it ~100× cheaper than the full-size image.

Each vendor's "for presentation" processing and VOI (a gamma, a sigmoid window, a LUT) bends the grey
scale its own way, so the same tissue reaches the model at other intensities from each site; a model
shared by the sites then fits the largest site's scale. `harmonize` maps the breast's own grey-level
percentiles onto one fixed scale, which undoes any monotone tone curve (not edge enhancement, a
spatial filter that the resize to the model's size mostly smooths away).
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
PERCENTILES = np.array([1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99], dtype=np.float64)
"""The breast's grey-level landmarks that `harmonize` puts in place: denser at the tails, where the skin
line and the densest tissue (lesions among it) lie."""
TARGET_RANGE = (0.1, 0.95)
"""Where the 1st and 99th percentiles land; the landmarks between are spaced evenly by percentile (a
uniform standard scale). The breast's darkest level goes to 0 with the background (air is a vendor's
offset, 0.02 to 0.1 of the range, not 0), 1 stays 1."""
MIN_BREAST_PIXELS = 64
"""Fewer breast pixels than this (no breast found) leave the grey levels as they are."""


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


def crop_to_breast(pixels: np.ndarray, mask: np.ndarray, stride: int) -> np.ndarray:
    """The bounding box of the breast (a view, no copy) given `breast_mask(pixels)`; the whole image when
    no breast is found."""
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


def harmonize(pixels: np.ndarray, breast: np.ndarray) -> np.ndarray:
    """Grey levels mapped so that the breast's `PERCENTILES` land on one fixed scale (`TARGET_RANGE`),
    piecewise linearly, with everything up to the breast's darkest level at 0 and 1 kept at 1: Nyúl and
    Udupa's histogram standardisation with a uniform standard. Monotone, so the order of grey levels (a
    lesion brighter than its surround) is kept.

    `breast`: the breast's grey levels (a subsample suffices); `pixels` may be the image at any size.
    """
    if breast.size < MIN_BREAST_PIXELS:
        return pixels
    low, high = TARGET_RANGE
    source = np.concatenate([[breast.min()], np.percentile(breast, PERCENTILES), [1.0]])
    # Tied landmarks (a flat or clipped breast) would leave np.interp undefined: a ramp of 1e-6 per
    # landmark makes them strictly increasing without moving any by a grey level.
    source = source + 1e-6 * np.arange(source.size)
    target = np.concatenate([[0.0], low + (high - low) * (PERCENTILES - 1) / 98, [1.0]])
    return np.interp(pixels, source, target).astype(np.float32)


def preprocess_view(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A canonically oriented view (`common.dicom.View.pixels`) as model input: float32 (H, W) in [0, 1].

    Harmonised after the resize: the same mapping, applied to ~100× fewer pixels.
    """
    mask, stride = breast_mask(pixels)
    breast = np.asarray(pixels[::stride, ::stride])[mask]
    return np.clip(harmonize(fit(crop_to_breast(pixels, mask, stride), size), breast), 0.0, 1.0)
