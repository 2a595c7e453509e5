"""Who is in the synthetic cohort: patients, their labelled breast, labels, splits and reader reads.

Each patient has one study of both breasts (4 images); the breast with the focal asymmetry is the labelled
exam, the other is its contralateral. Like the clinical study (460 patients, 65 malignant): about 14%
malignant, 69% dense breasts (BI-RADS c/d), symptoms more common with cancer. Class and density counts
are apportioned exactly per site and split, so every split has both classes and the shares hold even on a
small demo site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from common.labels import DENSE, SPLITS
from common.stats.delong import auc_ci, roc_auc
from common.synth.phantom import IDEAL_SEPARATION
from common.synth.readers import DEFAULT_READERS, Reader, read_cases, reader_rng

PREVALENCE = 0.14
"""Share of malignant exams (the study: 65 of 460)."""
DENSITY_SHARES = {"a": 0.07, "b": 0.24, "c": 0.47, "d": 0.22}
"""BI-RADS density mix: 69% dense (c/d), as in the study."""
SYMPTOMATIC = {True: 0.55, False: 0.25}
"""Chance of a palpable lump, pain or nipple discharge, for malignant and benign cases."""
CLINICAL_READER = Reader("clinical", 0.90, 0.62)
"""The clinical read in the `birads` column: the reporting radiologist, who recalls generously (4A–4C
count as 4)."""
_PLAN_STREAM = 0x5EED


@dataclass(frozen=True)
class Case:
    """One patient: one study, one labelled breast."""

    site: int
    index: int
    patient_id: str
    split: str
    malignant: bool
    density: str
    symptomatic: bool
    laterality: str
    age: int
    appearance: float
    """Lesion appearance latent: benign ~ N(0, 1), malignant ~ N(d′, 1) (see `phantom.sample_lesion`)."""
    birads: int
    reads: dict[str, str] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.density in DENSE


def ideal_observer(cases: list[Case]) -> dict | None:
    """The ideal observer's AUC on `cases`: each case scored by its lesion appearance latent, the one
    carrier of the label (every lesion feature follows it), so no observer of the pixels can beat it on
    these cases; its expectation is `phantom.IDEAL_AUC`. With the case counts and the DeLong 95% CI (None
    with fewer than 2 cases of a class); None when the cases lack a class."""
    malignant = np.array([c.malignant for c in cases], bool)
    positives, negatives = int(malignant.sum()), int((~malignant).sum())
    if not positives or not negatives:
        return None
    appearance = np.array([c.appearance for c in cases])
    if min(positives, negatives) < 2:
        auc, ci = roc_auc(malignant, appearance), None
    else:
        auc, low, high = auc_ci(malignant, appearance)
        ci = [round(low, 3), round(high, 3)]
    return {"auc": round(auc, 3), "auc_ci": ci, "exams": len(cases), "malignant": positives}


def default_val(train: int) -> int:
    """Validation exams when none are asked for: 15% of train, at least 4 (none for a test-only site)."""
    return max(4, round(0.15 * train)) if train else 0


def _malignant_count(n: int, prevalence: float) -> int:
    """Malignant exams in a split of n: the prevalence, rounded, but both classes whenever n ≥ 2."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(prevalence * n)))


def _apportion(n: int, shares: dict[str, float]) -> list[str]:
    """n labels in the given shares, by largest remainder (the counts sum to n exactly)."""
    quotas = {k: n * s for k, s in shares.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: counts[k] - quotas[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in shares for _ in range(counts[k])]


def plan_site(site: int, counts: dict[str, int], seed: int, readers: tuple[Reader, ...] = DEFAULT_READERS,
              prevalence: float = PREVALENCE) -> list[Case]:
    """The cases of one site (`counts`: exams per split), all drawn from the seed."""
    rng = np.random.default_rng([seed, site, _PLAN_STREAM])
    split, malignant = [], []
    for name in SPLITS:
        n = counts.get(name, 0)
        m = _malignant_count(n, prevalence)
        split += [name] * n
        malignant += [True] * m + [False] * (n - m)
    # Shuffled, so that neither patient IDs nor file order give away the split or the label.
    order = rng.permutation(len(split))
    split = [split[i] for i in order]
    malignant = np.array(malignant, bool)[order]
    n = len(split)
    # Density shares exact within each class, so density is no proxy for the label.
    density = np.empty(n, dtype="<U1")
    for cls in (True, False):
        idx = np.flatnonzero(malignant == cls)
        density[idx] = rng.permutation(_apportion(len(idx), DENSITY_SHARES))
    symptomatic = rng.random(n) < np.where(malignant, SYMPTOMATIC[True], SYMPTOMATIC[False])
    laterality = rng.choice(["L", "R"], n)
    age = np.clip(np.rint(rng.normal(52, 10, n) + 6 * malignant), 30, 88).astype(int)
    difficulty = rng.standard_normal(n)  # the case's appearance relative to its class, shared by all readers
    appearance = IDEAL_SEPARATION * malignant + difficulty
    dense = np.isin(density, DENSE)
    reads = {r.column: read_cases(r, malignant, dense, difficulty, reader_rng(seed, site, r.name))
             for r in readers}
    clinical_rng = reader_rng(seed, site, "birads-column")  # no reader can take this name ("-")
    clinical = read_cases(CLINICAL_READER, malignant, dense, difficulty, clinical_rng)
    return [
        Case(
            site=site,
            index=i,
            patient_id=f"S{site + 1}P{i + 1:04d}",
            split=split[i],
            malignant=bool(malignant[i]),
            density=str(density[i]),
            symptomatic=bool(symptomatic[i]),
            laterality=str(laterality[i]),
            age=int(age[i]),
            appearance=float(appearance[i]),
            birads=int(clinical[i][0]),
            reads={column: values[i] for column, values in reads.items()},
        )
        for i in range(n)
    ]

