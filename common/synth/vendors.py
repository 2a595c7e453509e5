"""Vendor profiles: how each (fictional) mammography unit turns a projection into stored DICOM pixels.

Sites differ as real units do: detector pixel size and matrix, bit depth, MONOCHROME1 or MONOCHROME2,
tone curve and edge enhancement of the vendor's "for presentation" processing, noise level and texture,
the way the VOI transform is given (linear or sigmoid window, or a VOI LUT table) and the transfer syntax.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from scipy import ndimage

ATTENUATION_RANGE = 1.5
"""Projected attenuation (phantom units: fat 0.35, gland 1) mapped to the top of the tone curve."""
VOI_LUT_BITS = 12
"""Output bits of the VOI LUT tables (one entry per stored value)."""


@dataclass(frozen=True)
class VendorProfile:
    key: str
    """Short name used in site folder names."""
    manufacturer: str
    model: str
    software: str
    detector_type: str
    """DICOM DetectorType: DIRECT (amorphous selenium) or SCINTILLATOR (CsI)."""
    spacing_mm: float
    """Detector pixel size at full resolution."""
    matrix: tuple[int, int]
    """Detector rows and columns at full resolution."""
    bits_stored: int
    photometric: str
    voi: str
    """How the VOI transform is stored: `linear` or `sigmoid` window, or `lut` (VOI LUT Sequence)."""
    transfer_syntax: UID
    gamma: float
    """Tone curve exponent of the vendor's presentation processing."""
    sharpen: float
    """Amount of unsharp masking (edge enhancement) over ~3 mm."""
    noise: float
    """Standard deviation of the noise as a fraction of the stored range."""
    noise_grain_mm: float
    """Correlation length of the noise: 0 = white (direct conversion), larger = blotchy (scintillator)."""
    offset: float
    """Stored value of air (no tissue) as a fraction of the stored range."""

    def shape(self, scale: float) -> tuple[int, int]:
        """Stored matrix at `scale` of the full detector resolution."""
        return max(32, round(self.matrix[0] * scale)), max(32, round(self.matrix[1] * scale))

    def spacing(self, scale: float) -> float:
        return self.spacing_mm / scale

    def perturbed(self, rng: np.random.Generator, unit: int) -> VendorProfile:
        """Another unit of the same model, for sites beyond the first of each vendor: the same make,
        another software release and calibration, so even same-vendor sites are not identical."""
        return replace(
            self,
            software=f"{self.software}-u{unit}",
            spacing_mm=round(self.spacing_mm * rng.uniform(0.94, 1.06), 4),
            gamma=self.gamma * rng.uniform(0.9, 1.1),
            sharpen=self.sharpen * rng.uniform(0.7, 1.3),
            noise=self.noise * rng.uniform(0.8, 1.25),
            offset=self.offset * rng.uniform(0.8, 1.2),
        )


PROFILES = (
    VendorProfile(
        key="helion", manufacturer="Helion Medical Systems", model="Lumina DR 3000", software="4.2.1",
        detector_type="SCINTILLATOR", spacing_mm=0.1, matrix=(2294, 1914), bits_stored=14,
        photometric="MONOCHROME2", voi="linear", transfer_syntax=JPEG2000Lossless,
        gamma=0.85, sharpen=0.6, noise=0.010, noise_grain_mm=0.8, offset=0.03,
    ),
    VendorProfile(
        key="nordvik", manufacturer="Nordvik Imaging", model="Senova 24", software="R11.3",
        detector_type="DIRECT", spacing_mm=0.07, matrix=(4096, 3328), bits_stored=12,
        photometric="MONOCHROME1", voi="lut", transfer_syntax=ExplicitVRLittleEndian,
        gamma=1.15, sharpen=0.2, noise=0.014, noise_grain_mm=0.0, offset=0.06,
    ),
    VendorProfile(
        key="kestrel", manufacturer="Kestrel Diagnostics", model="MX-9 Mammo", software="VB30A",
        detector_type="DIRECT", spacing_mm=0.085, matrix=(3584, 2816), bits_stored=16,
        photometric="MONOCHROME2", voi="sigmoid", transfer_syntax=RLELossless,
        gamma=1.0, sharpen=0.9, noise=0.008, noise_grain_mm=0.3, offset=0.1,
    ),
    VendorProfile(
        key="aurora", manufacturer="Aurora Radiologic", model="Vista M3", software="2.07",
        detector_type="SCINTILLATOR", spacing_mm=0.065, matrix=(3600, 2800), bits_stored=12,
        photometric="MONOCHROME1", voi="linear", transfer_syntax=JPEGLSLossless,
        gamma=0.75, sharpen=0.4, noise=0.013, noise_grain_mm=0.8, offset=0.02,
    ),
)


def site_profile(site: int, seed: int) -> VendorProfile:
    """Vendor of site `site` (0-based): the profiles in turn, perturbed from the second round on."""
    profile = PROFILES[site % len(PROFILES)]
    unit = site // len(PROFILES)
    if unit == 0:
        return profile
    return profile.perturbed(np.random.default_rng([seed, site, 0x7E4D0]), unit)


@dataclass(frozen=True)
class Presentation:
    """Stored pixels of one view and the VOI transform that displays them."""

    pixels: np.ndarray
    """uint16, as stored (MONOCHROME1 already inverted, right breasts already mirrored)."""
    window: tuple[float, float] | None
    """Window centre and width, when the VOI is a window."""
    lut: np.ndarray | None
    """VOI LUT table (first mapped value 0), when the VOI is a table."""


def present(profile: VendorProfile, attenuation: np.ndarray, mask: np.ndarray,
            rng: np.random.Generator, spacing: float) -> Presentation:
    """Apply the vendor's processing to a phantom projection: tone curve, edge enhancement, noise,
    quantisation to its bit depth and photometric interpretation, and a VOI window fitted to the breast,
    as units compute one per image. The window is fitted with the lesion in it, so a bright lesion darkens
    the rest of the breast: an image-wide cue that `common.preprocess.harmonize` removes."""
    maximum = 2**profile.bits_stored - 1
    v = np.clip(attenuation / ATTENUATION_RANGE, 0, 1) ** profile.gamma
    if profile.sharpen:
        v = v + profile.sharpen * (v - ndimage.gaussian_filter(v, 3.0 / spacing))
    noise = rng.standard_normal(v.shape, dtype=np.float32)
    if profile.noise_grain_mm:
        grain = profile.noise_grain_mm / spacing
        noise = ndimage.gaussian_filter(noise, grain)
        noise /= noise.std()
    # Quantum noise: fewer photons reach the detector under denser tissue.
    v = v + profile.noise * (0.7 + 0.6 * v) * noise
    stored = profile.offset + (0.92 - profile.offset) * v
    pixels = np.clip(np.rint(stored * maximum), 0, maximum)
    low, high = np.quantile(pixels[mask], [0.002, 0.9995])
    high = high + 0.02 * (high - low)  # headroom so the densest tissue is not clipped
    if profile.photometric == "MONOCHROME1":
        pixels = maximum - pixels
        low, high = maximum - high, maximum - low
    pixels = pixels.astype(np.uint16)
    if profile.voi == "lut":
        inverse = profile.photometric == "MONOCHROME1"
        return Presentation(pixels, None, _voi_table(low, high, maximum, inverse))
    # DICOM's linear window maps [c − 0.5 − (w − 1)/2, c − 0.5 + (w − 1)/2] onto the output range.
    width = float(high - low + 1)
    centre = float((low + high) / 2 + 0.5)
    if profile.voi == "sigmoid":
        width *= 0.7  # DICOM's sigmoid reaches only 12–88% at c ± w/2: narrower, so the breast spans 5–95%
    return Presentation(pixels, (round(centre, 1), round(width, 1)), None)


def _voi_table(low: float, high: float, maximum: int, inverse: bool) -> np.ndarray:
    """A VOI LUT over every stored value: a gentle S-curve across [low, high] (what vendors ship for
    soft-copy reading); for MONOCHROME1 the output stays MONOCHROME1 (high = dark)."""
    x = np.arange(maximum + 1, dtype=np.float64)
    t = np.clip((x - low) / (high - low), 0, 1)
    if inverse:
        t = 1 - t
    curve = t - 0.12 * np.sin(2 * np.pi * t) / (2 * np.pi)  # S-shape: steeper in the middle
    if inverse:
        curve = 1 - curve
    return np.rint(np.clip(curve, 0, 1) * (2**VOI_LUT_BITS - 1)).astype(np.uint16)
