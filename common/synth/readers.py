"""Simulated radiologists: BI-RADS reads (2, 3, 4A, 4B, 4C, 5) from an ordinal latent model.

Each reader sees a latent suspicion z per case, normal with unit variance in each class:

    z = mean(class, density) + ρ·case + √(1 − ρ²)·ε

`case` is the case's own difficulty (its lesion's appearance relative to its class; shared by every reader
and by the rendered image, so readers and models agree on the same hard cases) and ε the reader's own
noise. Dense breasts (c/d) hide lesions: the benign mean is raised and the malignant mean lowered by
DENSE_PENALTY / 2 each. The BI-RADS 4 cut and the malignant mean are solved so that, over the cases read,
the reader's specificity and sensitivity at BI-RADS ≥ 4 are the configured ones; the other categories sit
at fixed offsets from that cut. The AUC follows: about Φ((Φ⁻¹(sens) + Φ⁻¹(spec))/√2), a little lower for the
ties of six ordinal categories and the density mix.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

READS = ("2", "3", "4A", "4B", "4C", "5")
"""BI-RADS reads, in order of suspicion."""
_CUTS = np.array([-1.3, 0.0, 0.5, 1.0, 1.6])
"""Latent cut points between consecutive READS, relative to the BI-RADS ≥ 4 cut."""
DENSE_PENALTY = 0.6
"""Separation between the classes (latent SD units) that a reader loses in dense breasts."""
CASE_CORRELATION = 0.6
"""ρ: weight of the shared case difficulty in every reader's latent suspicion."""
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Reader:
    name: str
    sensitivity: float
    """At BI-RADS ≥ 4 (4A or higher)."""
    specificity: float

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"reader name {self.name!r}: use letters, digits and _ (starting with a letter)")
        for what, value in (("sensitivity", self.sensitivity), ("specificity", self.specificity)):
            if not 0 < value < 1:
                raise ValueError(f"reader {self.name}: {what} must be strictly between 0 and 1; got {value}")

    @property
    def column(self) -> str:
        return f"reader_{self.name}"


DEFAULT_READERS = (
    Reader("senior1", 0.86, 0.82),
    Reader("senior2", 0.81, 0.78),
    Reader("junior1", 0.71, 0.40),
    Reader("junior2", 0.69, 0.40),
)
"""The study's two senior and two junior radiologists (AUC 0.904, 0.862, 0.579, 0.564): sensitivity and
specificity solved so that this model reproduces those AUCs (0.906, 0.862, 0.579, 0.564 on 400,000 cases
with the cohort's 14% prevalence and 69% dense breasts); the juniors over-call (low specificity)."""


def parse_reader(text: str) -> Reader:
    """`NAME=SENS/SPEC`, e.g. `fellow=0.8/0.7`."""
    name, sep, rates = text.partition("=")
    sens, slash, spec = rates.partition("/")
    if not (sep and slash):
        raise ValueError(f"--reader {text!r}: expected NAME=SENS/SPEC, e.g. fellow=0.8/0.7")
    try:
        return Reader(name.strip(), float(sens), float(spec))
    except ValueError as exc:
        raise ValueError(f"--reader {text!r}: {exc}") from None


def _solve(target: float, rate, low: float = -8.0, high: float = 8.0) -> float:
    return optimize.brentq(lambda x: rate(x) - target, low, high, xtol=1e-10)


def read_cases(reader: Reader, malignant: np.ndarray, dense: np.ndarray, case: np.ndarray,
               rng: np.random.Generator) -> list[str]:
    """One BI-RADS read per case; the reader's sensitivity and specificity hold in expectation over
    exactly these cases (their mix of classes and densities)."""
    malignant, dense = np.asarray(malignant, bool), np.asarray(dense, bool)
    half = DENSE_PENALTY / 2
    dense_benign = dense[~malignant].mean() if (~malignant).any() else 0.0
    dense_malignant = dense[malignant].mean() if malignant.any() else 0.0
    # Benign mean 0 (fatty) / +half (dense): the cut that gives the specificity.
    cut = _solve(reader.specificity,
                 lambda t: (1 - dense_benign) * special.ndtr(t) + dense_benign * special.ndtr(t - half))
    # Malignant mean m (fatty) / m − half (dense): the m that gives the sensitivity.
    mean = _solve(reader.sensitivity, lambda m: (1 - dense_malignant) * special.ndtr(m - cut)
                  + dense_malignant * special.ndtr(m - half - cut))
    base = np.where(malignant, mean - np.where(dense, half, 0.0), np.where(dense, half, 0.0))
    own = rng.standard_normal(len(malignant))
    z = base + CASE_CORRELATION * np.asarray(case) + np.sqrt(1 - CASE_CORRELATION**2) * own
    return [READS[i] for i in np.searchsorted(cut + _CUTS, z)]


def reader_rng(seed: int, site: int, name: str) -> np.random.Generator:
    """Each reader's own random stream: adding or removing a reader leaves the others' reads unchanged."""
    return np.random.default_rng([seed, site, zlib.crc32(name.encode())])

