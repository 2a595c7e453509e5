"""What the synthetic cohort simulates: anatomy and lesions, vendor encodings, cohort make-up, readers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom.pixels import apply_voi_lut
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from common.synth import phantom
from common.synth.cohort import PREVALENCE, default_val, plan_site
from common.synth.dicom_writer import ImageInfo, StudyInfo, build_dataset
from common.synth.readers import DEFAULT_READERS, READS, Reader, parse_reader
from common.synth.vendors import PROFILES, present, site_profile

SHAPE, SPACING = (200, 160), 1.4


def _lesion_only(breast: phantom.Breast, lesion: phantom.Lesion, view: str) -> np.ndarray:
    """The lesion's contribution to a view: the same draw rendered with and without it."""
    with_lesion, _ = phantom.render_view(breast, view, SHAPE, SPACING, np.random.default_rng(5), lesion)
    without, _ = phantom.render_view(breast, view, SHAPE, SPACING, np.random.default_rng(5))
    return with_lesion - without


def test_lesion_is_seen_in_both_views_at_the_same_distance_from_the_nipple() -> None:
    rng = np.random.default_rng(0)
    for _ in range(6):
        breast = phantom.sample_breast("b", rng)
        lesion = phantom.sample_lesion(breast, 2.0, rng)
        offsets = {}
        for view in phantom.VIEWS:
            diff = _lesion_only(breast, lesion, view)
            assert diff.max() > 0.05  # visible in both views
            # The blob's centre: the peak once smoothed at the lesion's scale (spicules average out).
            smooth = ndimage.gaussian_filter(diff, lesion.radius / SPACING)
            row, col = np.unravel_index(np.argmax(smooth), SHAPE)
            geometry = phantom.ViewGeometry(breast, view, SHAPE, SPACING)
            expected = geometry.to_pixel(lesion)
            assert np.hypot(row - expected[0], col - expected[1]) * SPACING < 0.3 * lesion.radius + 2
            offsets[view] = (geometry.nipple[0] - row, geometry.nipple[1] - col)  # up, back
        # Same distance from the nipple, and the same side of it: lateral is up in CC and (tilted) in MLO.
        assert abs(offsets["CC"][1] - offsets["MLO"][1]) * SPACING < 0.5 * lesion.radius + 2
        assert abs(offsets["CC"][1] * SPACING - lesion.depth) < 0.5 * lesion.radius + 2
        if abs(lesion.lateral) > 10 and abs(lesion.superior) < 0.5 * abs(lesion.lateral):
            assert (offsets["CC"][0] > 0) == (offsets["MLO"][0] > 0) == (lesion.lateral > 0)


def test_malignant_lesions_are_denser_and_spiculated() -> None:
    rng = np.random.default_rng(1)
    breast = phantom.sample_breast("b", rng)
    benign = [phantom.sample_lesion(breast, a, rng) for a in rng.normal(0, 1, 200)]
    malignant = [phantom.sample_lesion(breast, a, rng) for a in rng.normal(phantom.IDEAL_SEPARATION, 1, 200)]
    for attr in ("contrast", "spicules", "suspicion"):
        mean = {name: np.mean([getattr(x, attr) for x in group])
                for name, group in (("benign", benign), ("malignant", malignant))}
        assert mean["malignant"] > 1.5 * mean["benign"], attr
    assert np.mean([m.margin / m.radius for m in malignant]) < np.mean([b.margin / b.radius for b in benign])
    # Size and position carry no label.
    assert abs(np.mean([m.radius for m in malignant]) - np.mean([b.radius for b in benign])) < 1.0
    sharp = phantom.sample_lesion(breast, 4.0, rng, conspicuity=2.0)
    assert sharp.contrast > 1.5 * phantom.sample_lesion(breast, 4.0, np.random.default_rng(0)).contrast


def test_density_raises_glandular_tissue_and_mlo_shows_the_pectoral_muscle() -> None:
    means = []
    for density in phantom.DENSITIES:
        rng = np.random.default_rng(2)
        breast = phantom.sample_breast(density, rng)
        image, mask = phantom.render_view(breast, "CC", SHAPE, SPACING, rng)
        means.append(image[mask].mean())
        assert mask[:, 0].any() and not mask[:, -1].any()  # chest wall at column 0
        mlo, _ = phantom.render_view(breast, "MLO", SHAPE, SPACING, rng)
        assert mlo[:10, :5].mean() > mlo[-40:-30, :5].mean()  # the muscle, top-left
    assert means == sorted(means)
    with pytest.raises(ValueError, match="density"):
        phantom.sample_breast("e", np.random.default_rng(0))


def test_monochrome1_and_lut_encodings_display_like_monochrome2() -> None:
    rng = np.random.default_rng(3)
    breast = phantom.sample_breast("c", rng)
    attenuation, mask = phantom.render_view(breast, "CC", SHAPE, SPACING, rng)
    study = StudyInfo("P", "A^B", "19700101", 50, "1.2.3", "1.2.4", "1.2.5", "20200101", "120000", "A1", "H",
                      "S")
    image = ImageInfo("1.2.6", 1, "L", "CC", SPACING)
    for profile in PROFILES:
        shown = {}
        for photometric in ("MONOCHROME1", "MONOCHROME2"):
            variant = dataclasses.replace(profile, photometric=photometric)
            presented = present(variant, attenuation, mask, np.random.default_rng(4), SPACING)
            ds = build_dataset(variant, study, image, presented)
            out = apply_voi_lut(presented.pixels, ds).astype(float)
            out /= 2**12 - 1 if profile.voi == "lut" else 2**profile.bits_stored - 1
            shown[photometric] = 1 - out if photometric == "MONOCHROME1" else out
        assert np.abs(shown["MONOCHROME1"] - shown["MONOCHROME2"]).max() < 0.01, profile.key
        # Denser is brighter once displayed, and the breast spans most of the output range.
        assert shown["MONOCHROME2"][mask].mean() > shown["MONOCHROME2"][~mask].mean() + 0.2
        assert np.ptp(shown["MONOCHROME2"][mask]) > 0.6


def test_sites_beyond_the_profiles_are_perturbed_units() -> None:
    fifth = site_profile(4, seed=0)
    assert fifth.manufacturer == PROFILES[0].manufacturer and fifth != PROFILES[0]
    assert site_profile(4, seed=0) == fifth and site_profile(4, seed=1) != fifth


def test_cohort_counts_prevalence_density_and_symptoms() -> None:
    counts = {"train": 380, "val": default_val(380), "test": 120}
    cases = plan_site(0, counts, seed=0)
    assert counts["val"] == 57 and default_val(10) == 4 and default_val(0) == 0
    for split, n in counts.items():
        in_split = [c for c in cases if c.split == split]
        assert len(in_split) == n
        assert abs(sum(c.malignant for c in in_split) / n - PREVALENCE) < 0.01
    dense = np.array([c.dense for c in cases])
    malignant = np.array([c.malignant for c in cases])
    assert abs(dense.mean() - 0.69) < 0.01
    assert abs(dense[malignant].mean() - dense[~malignant].mean()) < 0.02  # density is no proxy
    symptomatic = np.array([c.symptomatic for c in cases])
    assert symptomatic[malignant].mean() > symptomatic[~malignant].mean() + 0.15
    assert len({c.patient_id for c in cases}) == len(cases)
    # Tiny splits still hold both classes; IDs do not give the label away.
    small = plan_site(1, {"train": 3, "val": 2, "test": 2}, seed=0)
    for split in ("train", "val", "test"):
        assert {c.malignant for c in small if c.split == split} == {True, False}


def _reads(reader: Reader, n: int = 6000, seed: int = 0):
    cases = plan_site(0, {"test": n}, seed=seed, readers=(reader,))
    malignant = np.array([c.malignant for c in cases])
    rank = np.array([READS.index(c.reads[reader.column]) for c in cases])
    return cases, malignant, rank


def test_reader_reaches_its_configured_sensitivity_and_specificity() -> None:
    _, malignant, rank = _reads(Reader("x", 0.9, 0.8))
    positive = rank >= READS.index("4A")
    assert abs(positive[malignant].mean() - 0.9) < 0.03
    assert abs((~positive[~malignant]).mean() - 0.8) < 0.02
    assert set(np.unique(rank)) == set(range(len(READS)))  # every category is used


STUDY_AUCS = (0.904, 0.862, 0.579, 0.564)


@pytest.mark.parametrize(("reader", "auc"), list(zip(DEFAULT_READERS, STUDY_AUCS, strict=True)))
def test_default_readers_match_the_study_and_do_worse_in_dense_breasts(reader: Reader, auc: float) -> None:
    cases, malignant, rank = _reads(reader, n=8000)
    assert abs(roc_auc_score(malignant, rank) - auc) < 0.025
    dense = np.array([c.dense for c in cases])
    assert roc_auc_score(malignant[dense], rank[dense]) < roc_auc_score(malignant[~dense], rank[~dense])


def test_readers_agree_on_hard_cases_and_parse() -> None:
    cases = plan_site(0, {"test": 3000}, seed=0)
    senior1, senior2 = ([READS.index(c.reads[r.column]) for c in cases] for r in DEFAULT_READERS[:2])
    assert np.corrcoef(senior1, senior2)[0, 1] > 0.5
    assert parse_reader(" fellow=0.8/0.7") == Reader("fellow", 0.8, 0.7)
    for bad in ("fellow", "fellow=0.8", "=0.8/0.7", "f-1=0.8/0.7", "f=0/0.7", "f=a/b"):
        with pytest.raises(ValueError):
            parse_reader(bad)
