"""One view's pixels made into a model input: cropped to the breast, resized with its aspect kept, padded,
its grey levels harmonised.

Input and output follow the canonical orientation of `common.dicom`: chest wall at column 0, higher =
denser, values in [0, 1]. The breast is found on a strided copy of the image at most `MASK_SIDE` pixels
high and wide: a mask needs no anti-aliasing, and this keeps it ~100× cheaper than the full-size image.

Each vendor's "for presentation" processing and VOI (a gamma, a sigmoid window, a LUT) bends the grey
scale its own way, so the same tissue reaches the model at other intensities from each site; a model
shared by the sites then fits the largest site's scale. `harmonize` maps landmarks of the breast's own
grey levels onto fixed levels (not edge enhancement, a spatial filter that the resize to the model's size
mostly smooths away).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

VERSION = 2
"""Of the model inputs that reading and preprocessing make (2: grey levels harmonised). Bumped whenever a
change alters them: cached views and trained weights record it, and weights trained on other inputs are
refused rather than fed inputs they never saw."""
MASK_SIDE = 256
EDGE_STRIP = 0.02
"""Width of the strip along the left and right image edges, as a fraction of the width, where the breast
is looked for: it touches the edge on the chest-wall side only."""
BACKGROUND_TAIL = 0.05
SIDE_MARGIN = 0.1
"""How much more of the image height the breast must cover along one edge than along the other for the
pixels to tell the chest-wall side."""
LANDMARKS = ((0.1, 0.0), (10.0, 0.15), (50.0, 0.45), (99.0, 0.9))
"""(percentile of the breast's grey levels, where `harmonize` puts it): the skin line's darkest pixels at
the background's 0 (the breast's minimum would let a stray pixel move every grey level), the fat, the
midtones, the densest tissue, at the levels of a linear presentation. Few landmarks, not a full histogram
match: equalising every decile squeezes the sparse bright tail, where a lesion lies, and flattens its
contrast."""
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
    """Grey levels mapped piecewise linearly so that the breast's `LANDMARKS` land on fixed levels, the
    background below the first at 0; above the top landmark the upper segment's slope goes on, keeping
    the contrast of what is brighter than the tissue. Monotone, so the order of grey levels is kept.
    Nyúl and Udupa's histogram standardisation, with few landmarks.

    Undoes a vendor's offset, window and most of a tone curve's bend, and with them a cue no lesion gives:
    an image-wide window that a bright lesion stretched. `breast`: the breast's grey levels (a subsample
    suffices); `pixels`: the image at any size. Values may exceed 1 above the top landmark.
    """
    if breast.size < MIN_BREAST_PIXELS:
        return pixels
    percentiles, levels = zip(*LANDMARKS, strict=True)
    # Tied landmarks (a flat or clipped breast) would divide by zero: a ramp of 1e-6 parts them.
    source = np.percentile(breast, percentiles) + 1e-6 * np.arange(len(percentiles))
    target = np.asarray(levels)
    slope = (target[-1] - target[-2]) / (source[-1] - source[-2])
    top = max(1.0, source[-1] + 1e-3)
    source, target = np.append(source, top), np.append(target, target[-1] + slope * (top - source[-1]))
    return np.interp(pixels, source, target).astype(np.float32)


def preprocess_view(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A canonically oriented view (`common.dicom.View.pixels`) as model input: float32 (H, W) in [0, 1].

    Harmonised after the resize: the same mapping, applied to ~100× fewer pixels.
    """
    mask, stride = breast_mask(pixels)
    breast = np.asarray(pixels[::stride, ::stride])[mask]
    return np.clip(harmonize(fit(crop_to_breast(pixels, mask, stride), size), breast), 0.0, 1.0)
