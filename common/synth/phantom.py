"""The breast phantom: one breast's anatomy and lesion, projected into a CC or MLO view.

`render_view` returns the projected attenuation of one view on a detector grid, in the canonical
orientation (chest wall at column 0, nipple to the right; CC: lateral at the top; MLO: superior at the
top, pectoral muscle top-left), scaled so that fat ≈ 0.35 and fully glandular tissue ≈ 1 at full
compressed thickness. Turning that into a vendor's stored pixels is `common.synth.vendors`' job.

Breast coordinates, shared by both views of a breast so a lesion lands consistently: `depth` = distance
from the nipple towards the chest wall, `lateral` (+ lateral / − medial) and `superior` (+ / −) offsets
from the nipple axis, all in mm. CC projects along superior–inferior (the image's vertical is −lateral);
MLO projects along an axis tilted by the C-arm angle, so its vertical mixes superior and lateral: a lesion
has the same distance from the nipple in both views and an upper-outer one is high in both.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import fft, ndimage, special

VIEWS = ("CC", "MLO")
DENSITIES = ("a", "b", "c", "d")
FAT = 0.35
"""Attenuation of fat at full thickness; fully glandular tissue is 1."""
MLO_DEPTH_FACTOR = 1.08
"""MLO shows more of the breast than CC (the pectoral side): its nipple lies this much further out."""
MLO_ANGLE = math.radians(45)
"""C-arm angle of the MLO view: its vertical axis mixes superior (cos) and lateral (sin)."""
IDEAL_SEPARATION = 2.0
"""d′ of the lesion appearance latent between benign and malignant: an observer that saw every lesion
feature exactly would reach AUC Φ(d′/√2) ≈ 0.92; density masking, noise and resolution take from that."""
IDEAL_AUC = float(special.ndtr(IDEAL_SEPARATION / math.sqrt(2)))
MASKING = 0.5
"""Share of a lesion's contrast lost where it lies in fully glandular tissue (it replaces tissue of similar
attenuation): why dense breasts hide lesions."""
DEFAULT_CONSPICUITY = 1.0
"""Multiplier of every lesion's contrast: the knob that makes the cohort easier (> 1) or harder (< 1)."""

# Range of the share of the breast's area that is fibroglandular, per BI-RADS density (a: almost entirely
# fat, b: scattered, c: heterogeneously dense, d: extremely dense).
_GLANDULAR_SHARE = {"a": (0.03, 0.15), "b": (0.18, 0.38), "c": (0.42, 0.62), "d": (0.66, 0.82)}
_EDGE_MM = 14.0
"""Width of the breast periphery where the compressed thickness falls to zero at the skin."""


@dataclass(frozen=True)
class Breast:
    """One breast's anatomy, shared by its CC and MLO views (lengths in mm)."""

    density: str
    glandular_share: float
    """Share of the breast's projected area that is fibroglandular; follows the density category."""
    depth: float
    """Nipple to chest wall in CC; MLO shows a little more."""
    half_width: float
    """Half the breast's extent across the nipple axis at the chest wall."""
    roundness: float
    """Superellipse exponent of the outline: 2 = elliptic, larger = fuller."""
    nipple_offset: float
    """Vertical offset of the nipple from the detector centre."""
    pectoral: tuple[float, float, float]
    """MLO pectoral muscle: width at the top edge, length down the chest wall (both as fractions of the
    breast depth and of the image height) and the curvature exponent of its edge."""
    layout: tuple[tuple[float, float, float, float], ...]
    """Low-frequency glandular layout (frequency u, frequency v, phase, weight) in breast-normalised
    coordinates: the same for both views and for the contralateral breast, so the two breasts look alike
    except for the lesion."""

    def twin(self, rng: np.random.Generator) -> Breast:
        """The contralateral breast: same density and layout, slightly different size and shape."""
        return replace(
            self,
            depth=self.depth * rng.uniform(0.95, 1.05),
            half_width=self.half_width * rng.uniform(0.95, 1.05),
            nipple_offset=self.nipple_offset + rng.normal(0, 4),
        )


@dataclass(frozen=True)
class Lesion:
    """A focal asymmetry; its look follows `suspicion` from benign (0) to malignant (1)."""

    depth: float
    lateral: float
    superior: float
    radius: float
    suspicion: float
    """0 = soft, ill-defined, tissue-like; 1 = dense, compact, irregular, spiculated."""
    contrast: float
    """Peak extra attenuation over fat, before density masking."""
    margin: float
    """Width of the margin's blur in mm: large = ill-defined."""
    harmonics: tuple[float, ...]
    """Amplitudes of the margin's irregularity (harmonics 2, 3, …)."""
    spicules: int
    spicule_length: float
    """Mean spicule length in mm."""


def sample_breast(density: str, rng: np.random.Generator) -> Breast:
    if density not in DENSITIES:
        raise ValueError(f"density must be one of {DENSITIES}; got {density!r}")
    dense = density in ("c", "d")
    # Dense breasts tend to be smaller: sizes are drawn a little smaller for c/d.
    size = rng.uniform(0.8, 1.0) if dense else rng.uniform(0.88, 1.12)
    layout = tuple(
        (rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * math.pi), rng.normal(0, 1))
        for _ in range(6)
    )
    return Breast(
        density=density,
        glandular_share=float(rng.uniform(*_GLANDULAR_SHARE[density])),
        depth=float(rng.uniform(75, 125) * size),
        half_width=float(rng.uniform(75, 100) * size),
        roundness=float(rng.uniform(1.8, 2.6)),
        nipple_offset=float(rng.normal(0, 6)),
        pectoral=(float(rng.uniform(0.3, 0.55)), float(rng.uniform(0.45, 0.8)), float(rng.uniform(0.7, 1.3))),
        layout=layout,
    )


def sample_lesion(
    breast: Breast, appearance: float, rng: np.random.Generator, conspicuity: float = DEFAULT_CONSPICUITY
) -> Lesion:
    """A lesion whose features all follow one appearance latent (benign ~ N(0, 1), malignant ~ N(d′, 1)).

    Size and position do not depend on it, so they carry no shortcut to the label. `conspicuity` scales
    the lesion's contrast (DEFAULT_CONSPICUITY).
    """
    q = float(special.ndtr(appearance - IDEAL_SEPARATION / 2))  # 0 … 1, benign median 0.16, malignant 0.84
    depth = breast.depth * rng.uniform(0.25, 0.75)
    # Keep it well inside the breast at that depth in both views.
    reach = 0.55 * breast.half_width * _profile_width(depth / breast.depth, breast.roundness)
    angle = rng.uniform(0, 2 * math.pi)
    radial = reach * math.sqrt(rng.uniform(0, 1))
    n_spicules = round(max(0.0, q - 0.35) / 0.65 * 14 + rng.normal(0, 1)) if q > 0.35 else 0
    radius = rng.uniform(5.0, 12.5)
    return Lesion(
        depth=float(depth),
        lateral=float(radial * math.cos(angle)),
        superior=float(radial * math.sin(angle)),
        radius=float(radius),
        suspicion=q,
        contrast=float(conspicuity * (0.15 + 0.45 * q) * rng.uniform(0.9, 1.1)),
        margin=float(radius * (0.5 - 0.38 * q) * rng.uniform(0.85, 1.15)),
        harmonics=tuple(float((0.04 + 0.22 * q) * rng.uniform(0.3, 1.0) / k**0.5) for k in range(2, 7)),
        spicules=max(0, n_spicules),
        spicule_length=float(radius * (0.6 + 1.2 * q) * rng.uniform(0.8, 1.2)),
    )


def _profile_width(u: float, roundness: float) -> float:
    """Breast half-width at normalised depth u (0 = nipple, 1 = chest wall) as a fraction of the widest."""
    return (1.0 - (1.0 - min(max(u, 0.0), 1.0)) ** roundness) ** (1.0 / roundness)


@functools.lru_cache(maxsize=8)
def _power_law_amplitude(shape: tuple[int, int], spacing: float, beta: float, stretch: float) -> np.ndarray:
    fy = fft.fftfreq(shape[0], d=spacing)[:, None]
    fx = fft.fftfreq(shape[1], d=spacing)[None, :]
    f = np.maximum(np.sqrt((fx / stretch) ** 2 + fy**2), 1 / 60.0)
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0  # zero mean
    # ifft2 divides by N = rows·cols: unit variance of each part needs Σ amplitude² = N².
    return (amplitude * (shape[0] * shape[1] / np.sqrt((amplitude**2).sum()))).astype(np.float32)


def power_law_noise(shape: tuple[int, int], spacing: float, rng: np.random.Generator, beta: float = 3.0,
                    stretch: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """Two independent unit-variance 1/f^β noise fields: the classic model of mammographic anatomical
    texture (β ≈ 3), a little elongated along the nipple–chest-wall axis as the ducts are. Frequencies
    below 1/(60 mm) are cut. One complex FFT gives both (its real and imaginary parts)."""
    amplitude = _power_law_amplitude(shape, round(spacing, 6), beta, stretch)
    white = rng.standard_normal((2, *shape), dtype=np.float32)
    field = fft.ifft2(amplitude * (white[0] + 1j * white[1]).astype(np.complex64))
    return field.real, field.imag


def _splat(points: np.ndarray, weights: np.ndarray | float, shape: tuple[int, int]) -> np.ndarray:
    """Accumulate weighted points ((n, 2) pixel row, col) into an image: curves sampled every half pixel."""
    rows = np.rint(points[:, 0]).astype(np.int64)
    cols = np.rint(points[:, 1]).astype(np.int64)
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), (len(points),))[keep]
    flat = np.bincount(rows[keep] * shape[1] + cols[keep], weights=weights, minlength=shape[0] * shape[1])
    return flat.reshape(shape)


def _line_weight(integral: float, spacing: float) -> float:
    """Weight per point of a curve sampled every half pixel so that the rendered line's integral across it
    is `integral` (value × mm) at any pixel size: a thin line fades, rather than vanishes, when coarse."""
    return integral / (2 * spacing)


def _random_walks(starts: np.ndarray, headings: np.ndarray, lengths: np.ndarray, wiggle: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random curves from `starts` ((n, 2) pixel row, col) along `headings` (radians) for `lengths`
    (pixels), sampled every half pixel: all their points (m, 2) and how far along its curve each is (0…1)."""
    steps = max(2, int(lengths.max() / 0.5))
    turns = np.cumsum(rng.normal(0, wiggle, (len(starts), steps)), axis=1)
    angles = headings[:, None] + ndimage.gaussian_filter1d(turns, 3, axis=1)
    paths = starts[:, None, :] + 0.5 * np.cumsum(np.stack([np.sin(angles), np.cos(angles)], axis=-1), axis=1)
    along = np.arange(1, steps + 1) * 0.5 / lengths[:, None]
    keep = along <= 1
    return paths[keep], along[keep]


class ViewGeometry:
    """Where the breast lies on the detector in one view, in pixels and mm."""

    def __init__(self, breast: Breast, view: str, shape: tuple[int, int], spacing: float):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}; got {view!r}")
        self.view, self.shape, self.spacing = view, shape, spacing
        height = shape[0] * spacing
        self.depth = breast.depth * (MLO_DEPTH_FACTOR if view == "MLO" else 1.0)
        self.nipple_y = height * (0.5 if view == "CC" else 0.56) + breast.nipple_offset
        y = (np.arange(shape[0]) + 0.5) * spacing
        x = (np.arange(shape[1]) + 0.5) * spacing
        self.x, self.y = x[None, :], y[:, None]
        if view == "CC":
            above = below = breast.half_width
        else:  # MLO: the axillary tail runs off the top of the detector, the fold sits near the bottom
            above, below = max(breast.half_width * 1.5, self.nipple_y * 1.25), breast.half_width * 1.1
        reach = np.where(y < self.nipple_y, above, below)
        v = (y - self.nipple_y) / reach  # −1 … 1 across the breast
        outline = self.depth * np.clip(1 - np.abs(v) ** breast.roundness, 0, None) ** (1 / breast.roundness)
        outline += 4.0 * np.exp(-(((y - self.nipple_y) / 6.0) ** 2))  # the nipple
        # Distance to the skin: the horizontal distance to the outline times the cosine of its slope,
        # exact for a straight edge and close for this smooth one (a distance transform costs 10× more).
        slope = np.gradient(outline, spacing)
        self.skin_distance = ((outline[:, None] - self.x) / np.sqrt(1 + slope**2)[:, None]).astype(np.float32)
        self.mask = self.skin_distance > 0
        self.u = 1 - self.x / self.depth  # 0 at the nipple, 1 at the chest wall, per column
        self.v = v[:, None]  # per row

    @property
    def nipple(self) -> tuple[float, float]:
        """(row, col) of the nipple."""
        return self.nipple_y / self.spacing - 0.5, self.depth / self.spacing - 0.5

    def to_pixel(self, lesion: Lesion) -> tuple[float, float]:
        """(row, col) of a lesion centre in this view."""
        if self.view == "CC":
            up = lesion.lateral
        else:
            up = lesion.superior * math.cos(MLO_ANGLE) + lesion.lateral * math.sin(MLO_ANGLE)
        return (self.nipple_y - up) / self.spacing - 0.5, (self.depth - lesion.depth) / self.spacing - 0.5


def _parenchyma(breast: Breast, geo: ViewGeometry, texture: np.ndarray) -> np.ndarray:
    """Glandular fraction 0…1: a cone behind the nipple (towards the axilla in MLO), modulated by the
    breast's shared low-frequency layout and by texture, thresholded so that the breast's density category
    sets the glandular share of its area; the texture's troughs become the fat lobules."""
    u, v = geo.u, geo.v
    centre = 0.12 if geo.view == "MLO" else 0.0  # MLO: glands spread towards the upper outer quadrant
    envelope = (2.0 * np.exp(-(((v + centre) / 0.6) ** 2))).astype(np.float32) * np.exp(
        -(((u - 0.45) / 0.32) ** 2)).astype(np.float32)
    # Σ w·cos(2π(fu·u + fv·v) + φ): u varies along columns only and v along rows only, so each term is
    # cos·cos − sin·sin of a column and a row vector (a BLAS product would be shorter, but its threads
    # spin and double the CPU time in the worker processes).
    layout = np.zeros(geo.shape, np.float32)
    for fu, fv, phase, weight in breast.layout:
        a = (2 * math.pi * fv * v + phase).astype(np.float32)
        b = (2 * math.pi * fu * u).astype(np.float32)
        layout += (0.15 * weight * np.cos(a)) * np.cos(b) - (0.15 * weight * np.sin(a)) * np.sin(b)
    field = envelope + layout + 0.5 * texture
    level = np.quantile(field[geo.mask][::5], 1 - breast.glandular_share)  # a subsample is precise enough
    return special.expit((field - level) / np.float32(0.2))


def _lines(geo: ViewGeometry, rng: np.random.Generator) -> np.ndarray:
    """Ducts converging on the nipple and a few vessels crossing the breast, as extra attenuation."""
    px = 1 / geo.spacing
    nipple = np.array([geo.nipple_y * px - 0.5, geo.depth * px - 0.5])
    n = int(rng.integers(12, 25))
    ducts, _ = _random_walks(np.tile(nipple, (n, 1)), math.pi + rng.normal(0, 0.35, n),
                             rng.uniform(0.25, 0.6, n) * geo.depth * px, 0.04, rng)
    n = int(rng.integers(2, 5))
    starts = np.stack([rng.uniform(0.1, 0.9, n) * geo.shape[0], np.zeros(n)], axis=1)
    lengths = rng.uniform(0.5, 1.0, n) * geo.depth * px
    vessels, _ = _random_walks(starts, rng.normal(0, 0.5, n), lengths, 0.06, rng)
    image = _splat(ducts, _line_weight(0.03, geo.spacing), geo.shape)
    image += _splat(vessels, _line_weight(0.08, geo.spacing), geo.shape)
    return ndimage.gaussian_filter(image.astype(np.float32), max(0.5, 0.6 / geo.spacing))


def _pectoral(breast: Breast, geo: ViewGeometry) -> np.ndarray:
    """MLO pectoral muscle: a bright band at the top-left, wider at the top, with a soft edge."""
    width_frac, length_frac, curve = breast.pectoral
    width = width_frac * geo.depth
    length = length_frac * geo.shape[0] * geo.spacing
    muscle = np.zeros(geo.shape, np.float32)
    rows = min(geo.shape[0], int(length / geo.spacing) + 1)
    cols = min(geo.shape[1], int((width + 8) / geo.spacing) + 1)
    y, x = geo.y[:rows], geo.x[:, :cols]
    edge = width * np.clip(1 - y / length, 0, None) ** curve
    muscle[:rows, :cols] = 0.75 * special.expit((edge - x) / 1.5) * (1 - 0.3 * y / length)
    return muscle


def _lesion(lesion: Lesion, geo: ViewGeometry, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The lesion's extra attenuation (before masking): a core with an irregular, blurred margin (tissue-like
    and mottled when benign-looking, solid when malignant-looking) and spicules radiating from it. Margin
    phases and spicule directions are drawn per view, as a 3-D lesion projects differently."""
    row, col = geo.to_pixel(lesion)
    s = geo.spacing
    reach = (lesion.radius + lesion.spicule_length + 3 * lesion.margin) / s + 2
    r0, r1 = max(0, int(row - reach)), min(geo.shape[0], int(row + reach) + 1)
    c0, c1 = max(0, int(col - reach)), min(geo.shape[1], int(col + reach) + 1)
    out = np.zeros(geo.shape, np.float32)
    if r0 >= r1 or c0 >= c1:
        return out
    dy = (np.arange(r0, r1)[:, None] - row) * s
    dx = (np.arange(c0, c1)[None, :] - col) * s
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    boundary = np.full_like(rho, lesion.radius)
    for k, amp in enumerate(lesion.harmonics, start=2):
        boundary *= 1 + amp * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    core = special.expit((boundary - rho) / max(lesion.margin, 0.3))
    thickness = np.sqrt(np.clip(1 - (rho / (1.15 * boundary)) ** 2, 0, 1))
    solid = 0.55 + 0.45 * thickness
    mottled = np.clip(0.55 + 0.6 * texture[r0:r1, c0:c1], 0, 1.4)
    q = lesion.suspicion
    body = core * (q * solid + (1 - q) * mottled)

    if lesion.spicules:
        n = lesion.spicules
        angles = rng.uniform(0, 2 * math.pi, n)
        starts = np.array([row - r0, col - c0]) + np.stack([np.sin(angles), np.cos(angles)], axis=1) * (
            0.8 * lesion.radius / s)
        points, along = _random_walks(starts, angles, lesion.spicule_length * rng.uniform(0.6, 1.4, n) / s,
                                      0.02, rng)
        # Tapered: thinner (fainter) further out.
        lines = _splat(points, _line_weight(1.5, s) * (1 - 0.7 * along), body.shape)
        body = body + ndimage.gaussian_filter(lines, max(0.5, 0.7 / s))
    out[r0:r1, c0:c1] = lesion.contrast * body
    return out


def render_view(breast: Breast, view: str, shape: tuple[int, int], spacing: float, rng: np.random.Generator,
                lesion: Lesion | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Projected attenuation (float32, canonical orientation) and the breast mask of one view.

    `shape` is the detector's (rows, columns) and `spacing` its pixel size in mm.
    """
    geo = ViewGeometry(breast, view, shape, spacing)
    texture, fine = power_law_noise(shape, spacing, rng)
    gland = _parenchyma(breast, geo, texture)
    # Glandular tissue is not uniform: a second texture varies its density, which also hides lesions.
    gland *= 0.75 + 0.25 * np.tanh(fine)
    dist = np.clip(geo.skin_distance, 0, None)
    # Compressed thickness falls to zero over the periphery (a quarter circle), and the skin shows as a line.
    thickness = np.sqrt(1 - (1 - np.minimum(dist / _EDGE_MM, 1)) ** 2)
    tissue = thickness * (FAT + (1 - FAT) * gland + _lines(geo, rng))
    if view == "MLO":
        tissue = np.maximum(tissue, thickness * (FAT + _pectoral(breast, geo)))
    if lesion is not None:
        # Density masking: a lesion replaces tissue, so in glandular tissue it adds less than over fat.
        tissue += _lesion(lesion, geo, texture, rng) * thickness * (1 - MASKING * gland)
    tissue += 0.12 * np.exp(-dist / 1.2)
    tissue[~geo.mask] = 0
    return tissue, geo.mask
