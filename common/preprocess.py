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

The crop keeps the breast only: burned-in markers ("L MLO"), labels and rulers are separate bright regions,
and a scanner's border or a digitized film's clear edge is a frame of uniform lines around the image. The
frame is cut off first (`frame`), the breast is the largest region brighter than the background that
reaches the left or right edge (the chest wall), its holes filled (`breast_mask`), and the crop is its
bounding box with everything outside the breast (and a one-block margin) set to 0, the background, so that
a marker inside the box does not survive (`crop_to_breast`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

VERSION = 3
"""Of the model inputs that reading and preprocessing make (2: grey levels harmonised; 3: the crop keeps the
breast only, markers, labels, rulers and scanner borders set to background). Bumped whenever a
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
FRAME_MAX = 0.08
"""Most of the image height or width, per side, that `frame` may cut off as a scanner border."""
FRAME_TOLERANCE = 0.05
FRAME_SHARE = 0.98
"""An outer row or column is part of a frame when this share of its pixels lies within `FRAME_TOLERANCE`
of its median: a scanner's bed, a film's clear or black edge. A line through the breast is not uniform;
one that grazes the nipple's tip or the skin line may be, and costs at most that graze."""


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


def _uniform(line: np.ndarray) -> bool:
    return line.size > 0 and float(np.mean(np.abs(line - np.median(line)) <= FRAME_TOLERANCE)) >= FRAME_SHARE


def frame(small: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the image inside its frame, the outer rows and columns that are uniform
    (see `FRAME_SHARE`), at most `FRAME_MAX` of the image per side. Rows and columns are cut in turn until
    neither changes, so that a frame of several bands (a scanner's black bed, then a film's clear edge)
    comes off band by band although each row of one band crosses the others' columns."""
    rows, cols = small.shape
    most_rows, most_cols = int(FRAME_MAX * rows), int(FRAME_MAX * cols)
    top, bottom, left, right = 0, rows, 0, cols
    while True:
        before = top, bottom, left, right
        while top < most_rows and _uniform(small[top, left:right]):
            top += 1
        while rows - bottom < most_rows and _uniform(small[bottom - 1, left:right]):
            bottom -= 1
        while left < most_cols and _uniform(small[top:bottom, left]):
            left += 1
        while cols - right < most_cols and _uniform(small[top:bottom, right - 1]):
            right -= 1
        if (top, bottom, left, right) == before:
            return top, bottom, left, right


def _edge_strip(width: int) -> int:
    return max(1, round(width * EDGE_STRIP))


def locate_breast(pixels: np.ndarray) -> tuple[np.ndarray, int, tuple[int, int, int, int]]:
    """`breast_mask`, and the `frame` it was found in (mask pixels: top, bottom, left, right)."""
    stride = max(1, math.ceil(max(pixels.shape) / MASK_SIDE))
    small = np.asarray(pixels[::stride, ::stride], dtype=np.float32)
    mask = np.zeros(small.shape, dtype=bool)
    if small.max() <= small.min():
        return mask, stride, (0, small.shape[0], 0, small.shape[1])
    box = top, bottom, left, right = frame(small)
    inner = small[top:bottom, left:right]
    if inner.max() <= inner.min():
        return mask, stride, box
    components, count = ndimage.label(inner > background_threshold(inner))
    if count == 0:
        return mask, stride, box
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    strip = _edge_strip(inner.shape[1])
    at_edge = np.zeros(count + 1, dtype=bool)
    at_edge[components[:, :strip]] = at_edge[components[:, -strip:]] = True
    at_edge[0] = False
    if at_edge.any():
        sizes[~at_edge] = 0
    mask[top:bottom, left:right] = ndimage.binary_fill_holes(components == int(sizes.argmax()))
    return mask, stride, box


def breast_mask(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """The breast on a coarse grid: inside the `frame`, the largest connected region brighter than the
    background that reaches the left or right edge (the chest wall; the largest of all when none does),
    its holes filled.

    Returns the boolean mask and the stride it was computed at (mask pixel (i, j) is image pixel
    (i·stride, j·stride)). Burned-in markers, labels and rulers are regions of their own and are left out
    (one that touches the breast is not).
    """
    mask, stride, _ = locate_breast(pixels)
    return mask, stride


def chest_wall_side(pixels: np.ndarray) -> str | None:
    """'left' or 'right': the image edge the breast touches (the chest wall), inside the image's `frame`;
    None when unclear."""
    mask, _, (top, bottom, left, right) = locate_breast(pixels)
    inner = mask[top:bottom, left:right]
    strip = _edge_strip(inner.shape[1])
    left_cover = float(inner[:, :strip].any(axis=1).mean())
    right_cover = float(inner[:, -strip:].any(axis=1).mean())
    if abs(left_cover - right_cover) < SIDE_MARGIN:
        return None
    return "left" if left_cover > right_cover else "right"


def crop_box(shape: tuple[int, ...], mask: np.ndarray, stride: int,
             inside: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) in image pixels of the breast's bounding box given `breast_mask`, one mask
    block wider on every side so that the skin line is not cut, but not into the `frame` `inside` (in mask
    pixels) when given; None when no breast was found."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    top, bottom, left, right = inside or (0, mask.shape[0], 0, mask.shape[1])
    return (max(top, rows[0] - 1) * stride, min(shape[0], min(bottom, rows[-1] + 2) * stride),
            max(left, cols[0] - 1) * stride, min(shape[1], min(right, cols[-1] + 2) * stride))


def crop_to_breast(pixels: np.ndarray, mask: np.ndarray, stride: int,
                   inside: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The breast's `crop_box` given `breast_mask(pixels)` (and the `frame` it was found `inside`), with
    everything farther than one mask block from the breast, or in the frame, set to 0: a copy in which a
    marker or label inside the box is gone. The whole image when no breast is found."""
    box = crop_box(pixels.shape, mask, stride, inside)
    if box is None:
        return pixels
    top, bottom, left, right = box
    keep = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
    if inside is not None:
        within = np.zeros_like(keep)
        within[inside[0]:inside[1], inside[2]:inside[3]] = True
        keep &= within
    # Image pixel (r, c) lies in mask block (r // stride, c // stride); the box starts on a block.
    keep = keep[top // stride:(bottom - 1) // stride + 1, left // stride:(right - 1) // stride + 1]
    keep = np.repeat(np.repeat(keep, stride, axis=0), stride, axis=1)[:bottom - top, :right - left]
    return np.where(keep, pixels[top:bottom, left:right], np.float32(0.0)).astype(np.float32, copy=False)


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to `size` (height, width), anti-aliased when shrinking (torch's triangle filter)."""
    import torch  # ~2.5 s to import: scanning headers and reading labels must not pay for it
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.asarray(pixels, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].numpy()


def placement(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the model input's pixels that `fit` fills with an image of `shape`:
    resized with its aspect ratio kept to fit inside `size`, left-aligned, centred vertically."""
    height, width = size
    scale = min(height / shape[0], width / shape[1])
    rows, cols = min(height, max(1, round(shape[0] * scale))), min(width, max(1, round(shape[1] * scale)))
    top = (height - rows) // 2
    return top, top + rows, 0, cols


def fit(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize with the aspect ratio kept to fit inside `size`, then pad with 0 (background) to `size`:
    left-aligned, so the chest wall stays at column 0, and centred vertically (`placement`)."""
    top, bottom, left, right = placement(pixels.shape, size)
    out = np.zeros(size, dtype=np.float32)
    out[top:bottom, left:right] = resize(pixels, (bottom - top, right - left))
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


Box = tuple[float, float, float, float]
"""(top, bottom, left, right) of a region, as pixel edges: rows top ≤ r < bottom, columns left ≤ c < right."""


@dataclass(frozen=True)
class Geometry:
    """Where a model input's pixels lie in its DICOM file's stored pixel grid (Rows × Columns, as a viewer
    displays them): what `preprocess` did to the view, recorded so that a region of the model input maps
    back exactly. The steps, in order: mirrored left–right when `flipped` (`common.dicom.read_view`'s
    canonical orientation), cropped to `crop`, resized to fit `placed` of the model input."""

    shape: tuple[int, int]
    """(rows, columns) of the stored image."""
    flipped: bool
    crop: tuple[int, int, int, int]
    """The breast's crop box in the canonically oriented image (`crop_box`; the whole image without one)."""
    placed: tuple[int, int, int, int]
    """Where the resized crop lies in the model input (`placement`); the rest is padding."""

    def scale(self) -> tuple[float, float]:
        """Stored pixels per model-input pixel, (rows, columns)."""
        (top, bottom, left, right), (ptop, pbottom, pleft, pright) = self.crop, self.placed
        return (bottom - top) / (pbottom - ptop), (right - left) / (pright - pleft)

    def _mirror(self, left: float, right: float) -> tuple[float, float]:
        return (self.shape[1] - right, self.shape[1] - left) if self.flipped else (left, right)

    def to_source(self, box: Box) -> Box:
        """A box of the model input (pixel edges, padding clipped off) in the stored image's pixels."""
        (ptop, pbottom, pleft, pright), (top, _, left, _) = self.placed, self.crop
        rows, cols = self.scale()
        r0, r1 = (min(max(r, ptop), pbottom) for r in box[:2])
        c0, c1 = (min(max(c, pleft), pright) for c in box[2:])
        return (top + (r0 - ptop) * rows, top + (r1 - ptop) * rows,
                *self._mirror(left + (c0 - pleft) * cols, left + (c1 - pleft) * cols))

    def to_model(self, box: Box) -> Box:
        """A box of the stored image (pixel edges) in the model input's pixels: `to_source`'s inverse."""
        (ptop, _, pleft, _), (top, _, left, _) = self.placed, self.crop
        rows, cols = self.scale()
        c0, c1 = self._mirror(*box[2:])
        return (ptop + (box[0] - top) / rows, ptop + (box[1] - top) / rows,
                pleft + (c0 - left) / cols, pleft + (c1 - left) / cols)


def preprocess(pixels: np.ndarray, size: tuple[int, int],
               flipped: bool = False) -> tuple[np.ndarray, Geometry]:
    """A canonically oriented view (`common.dicom.View.pixels`; `flipped`: `View.flipped`) as model input,
    float32 (H, W) in [0, 1], and the `Geometry` that maps the input back onto the stored pixels.

    Harmonised after the resize: the same mapping, applied to ~100× fewer pixels.
    """
    mask, stride, inside = locate_breast(pixels)
    breast = np.asarray(pixels[::stride, ::stride])[mask]
    cropped = crop_to_breast(pixels, mask, stride, inside)
    crop = crop_box(pixels.shape, mask, stride, inside) or (0, pixels.shape[0], 0, pixels.shape[1])
    geometry = Geometry(pixels.shape, flipped, tuple(map(int, crop)), placement(cropped.shape, size))
    return np.clip(harmonize(fit(cropped, size), breast), 0.0, 1.0), geometry


def preprocess_view(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`preprocess`'s model input alone."""
    return preprocess(pixels, size)[0]
