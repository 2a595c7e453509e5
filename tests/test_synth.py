"""The synthetic cohort end to end: DICOM validity (dciodvfy), decoding, determinism, layout, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from common.cli import main
from common.dicom import read_view
from common.labels import REQUIRED_COLUMNS, SPLITS, read_labels
from common.protocol import ALL
from common.stats.delong import auc_ci
from common.synth.cohort import ideal_observer
from common.synth.dicom_writer import PATIENT_ORIENTATION
from common.synth.generate import CohortSpec, describe, generate, plan
from common.synth.phantom import IDEAL_AUC
from common.synth.readers import Reader
from common.synth.vendors import PROFILES
from server.report import synthetic_ceiling

SPEC = CohortSpec(train=(2, 2, 2, 2), val=(1, 1, 1, 1), test=(1, 1, 1, 1), seed=7, scale=0.06,
                  readers=(Reader("a", 0.9, 0.8), Reader("b", 0.6, 0.5)))
"""Four sites, one per vendor profile, four patients each, at a small matrix."""


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate(SPEC, out, workers=1, progress=False)
    return out


def _dicoms(cohort: Path, site: str) -> list[Path]:
    return sorted((cohort / site).rglob("*.dcm"))


def test_layout_labels_and_summary(cohort: Path) -> None:
    sites = plan(SPEC)
    assert sorted(p.name for p in cohort.iterdir()) == sorted([*(s.name for s in sites), "cohort.json",
                                                               "lesions.csv"])
    assert [s.name for s in sites] == [f"site{i + 1}_{p.key}" for i, p in enumerate(PROFILES)]
    summary = json.loads((cohort / "cohort.json").read_text())
    for site, described in zip(sites, summary["sites"], strict=True):
        with open(cohort / site.name / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == [*REQUIRED_COLUMNS, "reader_a", "reader_b"]
        labels, rejected = read_labels(cohort / site.name / "labels.csv")  # the product's own parser
        assert len(labels) == 4 and not rejected
        assert all(label.readers.keys() == {"reader_a", "reader_b"} for label in labels.values())
        assert [r["split"] for r in rows].count("train") == 2 == described["exams"]["train"]
        for row in rows:
            study = cohort / site.name / row["patient_id"] / row["study_uid"]
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(study.glob("*.dcm"))]
            # Both breasts imaged, CC and MLO: the labelled one and its contralateral.
            assert sorted((h.ImageLaterality, h.ViewPosition) for h in headers) == sorted(PATIENT_ORIENTATION)
            assert {h.StudyInstanceUID for h in headers} == {row["study_uid"]}
            assert row["pathology"] in ("benign", "malignant") and row["laterality"] in ("L", "R")
            assert row["birads"] in ("2", "3", "4", "5") and row["density"] in "abcd"
            assert row["reader_a"] in ("2", "3", "4A", "4B", "4C", "5")


def _mann_whitney(cases: list) -> float:
    """The AUC as the share of (malignant, benign) pairs the appearance latent orders right."""
    pos = [c.appearance for c in cases if c.malignant]
    neg = [c.appearance for c in cases if not c.malignant]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_cohort_json_states_the_ideal_observer_per_site_and_split(cohort: Path) -> None:
    # The plan alone (no images): 3 sites whose test splits hold both classes, and a val split of one class.
    spec = CohortSpec(train=(30, 20, 25), val=(1, 1, 1), test=(20, 15, 30), seed=5)
    sites = plan(spec)
    summary = describe(spec, sites)
    assert summary["ideal_observer_auc"] == round(IDEAL_AUC, 3) == 0.921  # the expectation
    everyone = [c for site in sites for c in site.cases]
    for cases, described in [*((s.cases, d) for s, d in zip(sites, summary["sites"], strict=True)),
                             (everyone, summary["total"])]:
        assert described["ideal_observer"]["val"] is None  # one exam: no class pair
        for split in ("train", "test"):
            chosen = [c for c in cases if c.split == split]
            entry = described["ideal_observer"][split]
            auc, low, high = auc_ci([c.malignant for c in chosen], [c.appearance for c in chosen])
            assert entry["auc"] == round(_mann_whitney(chosen), 3) == round(auc, 3)
            assert entry["auc_ci"] == [round(low, 3), round(high, 3)]
            assert entry["exams"] == len(chosen) and entry["malignant"] == sum(c.malignant for c in chosen)
    # A single malignant exam: the AUC, but no DeLong interval.
    few = [c for c in everyone if not c.malignant][:5] + [c for c in everyone if c.malignant][:1]
    assert ideal_observer(few) == {"auc": round(_mann_whitney(few), 3), "auc_ci": None, "exams": 6,
                                   "malignant": 1}
    # What `generate` writes is `describe`'s.
    written = json.loads((cohort / "cohort.json").read_text())
    assert written["total"]["ideal_observer"] == describe(SPEC, plan(SPEC))["total"]["ideal_observer"]
    assert set(written["sites"][0]["ideal_observer"]) == set(SPLITS)


def test_the_report_reads_the_ceiling_from_a_synthetic_data_root(cohort: Path, tmp_path: Path) -> None:
    written = json.loads((cohort / "cohort.json").read_text())
    ceiling = synthetic_ceiling(str(cohort))
    assert ceiling == {"seed": 7, "conspicuity": 1.0, "expected_auc": 0.921,
                       "sites": {s["name"]: s["ideal_observer"]["test"] for s in written["sites"]},
                       ALL: written["total"]["ideal_observer"]["test"]}
    # A deployed center knows no data root; real data has no cohort.json; an older one lacks the entry.
    assert synthetic_ceiling("") is None and synthetic_ceiling(tmp_path) is None
    (tmp_path / "cohort.json").write_text(json.dumps({**written, "total": {}}))
    assert synthetic_ceiling(tmp_path) is None


def test_every_transfer_syntax_decodes(cohort: Path) -> None:
    expected = [JPEG2000Lossless, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless]
    for site, profile, syntax in zip(plan(SPEC), PROFILES, expected, strict=True):
        files = _dicoms(cohort, site.name)
        assert len(files) == 4 * 4
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == path.stem
            pixels = ds.pixel_array
            assert pixels.shape == profile.shape(SPEC.scale) and pixels.dtype == np.uint16
            assert ds.Manufacturer == profile.manufacturer and ds.BitsStored == profile.bits_stored
            assert ds.PhotometricInterpretation == profile.photometric
            assert pixels.max() < 2**profile.bits_stored and pixels.std() > 0


def test_right_breasts_are_stored_mirrored(cohort: Path) -> None:
    for site in plan(SPEC):
        for path in _dicoms(cohort, site.name):
            ds = pydicom.dcmread(path)
            shown = apply_voi_lut(ds.pixel_array, ds).astype(float)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                shown = shown.max() - shown
            breast = shown > shown.min() + 0.1 * np.ptp(shown)
            left, right = breast[:, :3].mean(), breast[:, -3:].mean()
            # The chest wall (where the breast meets the image edge) is left for L, right for R.
            assert (left > right) == (ds.ImageLaterality == "L"), path
            assert list(ds.PatientOrientation) == PATIENT_ORIENTATION[ds.ImageLaterality, ds.ViewPosition]


def test_the_product_reader_reads_every_vendor_alike(cohort: Path) -> None:
    for site in plan(SPEC):
        for path in _dicoms(cohort, site.name)[:4]:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            view = read_view(path)
            assert (view.laterality, view.view) == (header.ImageLaterality, header.ViewPosition)
            assert view.pixels.min() >= 0 and view.pixels.max() <= 1
            # Canonical orientation: the breast against the left edge, air at the right.
            breast = view.pixels > view.pixels.min() + 0.1
            assert breast[:, :3].mean() > 0.2 and not breast[:, -3:].any(), path


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_accepts_every_vendor(cohort: Path) -> None:
    for site in plan(SPEC):
        for path in _dicoms(cohort, site.name)[:3]:
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            report = result.stdout + result.stderr
            assert "MammographyImageForPresentation" in report
            errors = [line for line in report.splitlines() if line.startswith("Error")]
            assert not errors, f"{site.name}: {path.name}: {errors}"


def test_same_seed_same_bytes_any_worker_count(cohort: Path, tmp_path: Path) -> None:
    # The first two sites alone, in two worker processes: each site's files depend only on the seed.
    two_sites = dataclasses.replace(SPEC, train=(2, 2), val=(1, 1), test=(1, 1))
    generate(two_sites, tmp_path, workers=2, progress=False)
    again = _files(tmp_path)
    assert len(again) == 2 * (16 + 1) + 2
    assert {k: v for k, v in again.items() if k not in ("cohort.json", "lesions.csv")} == {
        k: v for k, v in _files(cohort).items() if k.startswith(("site1_", "site2_"))}


def test_another_seed_differs(tmp_path: Path) -> None:
    small = {"train": (2,), "val": (0,), "test": (1,), "scale": 0.05}
    generate(CohortSpec(**small, seed=1), tmp_path / "a", workers=1, progress=False)
    generate(CohortSpec(**small, seed=2), tmp_path / "b", workers=1, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {k for k in a if k.endswith(".dcm")}.isdisjoint(b)  # other UIDs
    assert a["site1_helion/labels.csv"] != b["site1_helion/labels.csv"]


def test_cli_writes_and_replaces_a_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    argv = ["synth", str(out), "--sites", "2", "--train", "2,1", "--val", "0,0", "--test", "1,1",
            "--seed", "3", "--scale", "0.05", "--reader", "fellow=0.8/0.7"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "site2_nordvik" in printed
    # One test exam a site, both benign: no ceiling to state, and the command says so.
    assert json.loads((out / "cohort.json").read_text())["total"]["ideal_observer"]["test"] is None
    assert "test AUC n/a over all sites, 0.921 expected" in printed
    first = _files(out)
    with open(out / "site1_helion" / "labels.csv", newline="") as f:
        assert next(csv.reader(f))[-1] == "reader_fellow"
    assert main(argv) == 0  # a previous cohort is replaced, byte for byte the same
    assert _files(out) == first


def test_cli_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["synth", str(tmp_path), "--sites", "1", "--train", "1", "--test", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train", "2,2", "--test", "1,1,1"], "--train has 2 value(s) but there are 3 sites"),
        (["--train", "2,2,2", "--test", "1,1,1", "--val", "1"], "--val has 1 value(s) but there are 3 sites"),
        (["--train", "2,2,2", "--test", "1,1,1", "--reader", "x=0.9"], "expected NAME=SENS/SPEC"),
        (["--train", "2,2,2", "--test", "1,1,1", "--reader", "x=1.2/0.5"], "strictly between 0 and 1"),
        (["--train", "2,2,2", "--test", "1,1,1", "--scale", "0"], "scale must be in (0, 1]"),
    ],
)
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                    message: str) -> None:
    assert main(["synth", str(tmp_path / "out"), "--sites", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("sites = 2\ntrain = [5, 5, 5]\ntest = [2, 2]",
         "{} [synth] train = [5, 5, 5]: expected 2 values, one per site (sites = 2)"),
        ('sites = "2"', "{} [synth] sites = '2': expected an integer"),
        ("sites = 1\ntrain = [5]\ntest = [-1]", "{} [synth] test = [-1]: each must be >= 0"),
        ("sites = 1\ntrain = [5]\ntest = [1]\nscale = 0.1\nspeed = 2", "unknown key(s) speed"),
    ],
)
def test_cli_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str,
                           message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[synth]\n{toml}\n")
    assert main(["synth", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert message.format(config) in capsys.readouterr().err
