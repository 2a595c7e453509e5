"""`fedmammo train` and `fedmammo predict` end to end: on sites built from arrays, and once from DICOM."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch
from dicom_factory import write_site
from test_train import make_site

import client.predict
import client.train
from common.checkpoint import load_checkpoint, save_checkpoint
from common.cli import main
from common.preprocess import VERSION as INPUTS_VERSION
from common.rejection import Rejection

CONFIG = """
[data]
image_size = [{size}, {size}]
bilateral = {bilateral}
workers = 1
[train]
epochs = 2
batch_size = 8
lr = {lr}
num_threads = 1
"""


def write_config(path: Path, bilateral: bool = False, lr: float = 3e-4, size: int = 64) -> str:
    path.write_text(CONFIG.format(bilateral=str(bilateral).lower(), lr=lr, size=size))
    return str(path)


@pytest.fixture
def site_dir(tmp_path, monkeypatch) -> str:
    """A site folder whose preparation gives a site built from arrays at the configured size, with one
    rejected file."""

    def prepare_site(root, config, cache_dir=None, progress=True):
        site = make_site("hospital", size=config.data.image_size[0])
        site.rejections.append(Rejection("hospital/junk.dcm", "not DICOM: no preamble"))
        return site

    for module in (client.train, client.predict):
        monkeypatch.setattr(module, "prepare_site", prepare_site)
    (tmp_path / "hospital").mkdir()
    return str(tmp_path / "hospital")


def test_train_then_predict(site_dir, tmp_path, capsys) -> None:
    config, out = write_config(tmp_path / "c.toml"), tmp_path / "run"
    assert main(["train", site_dir, "--config", config, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped hospital/junk.dcm: not DICOM" in captured.err
    assert "test: AUC" in captured.out and "95% CI" in captured.out

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exams"] == {"train": 8, "val": 4, "test": 4}
    assert metrics["best_epoch"] in (1, 2) and len(metrics["history"]) == 2
    test = metrics["test"]
    assert test["n"] == 4 and test["n_malignant"] == 2
    assert 0 <= test["auc_low"] <= test["auc"] <= test["auc_high"] <= 1
    assert {"sensitivity", "specificity", "loss"} <= test.keys()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_002.safetensors", "latest"]
    best = load_checkpoint(out / "best.safetensors")
    assert best.metadata["epoch"] == metrics["best_epoch"]
    assert not any(k.startswith("optimizer::") for k in best.tensors)

    assert main(["train", site_dir, "--config", config, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err

    predictions, weights = tmp_path / "p.json", str(out / "best.safetensors")
    predict = ["predict", site_dir, "--weights", weights]
    assert main([*predict, "--split", "all", "--json", str(predictions)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("exam") and "all (16 exams): AUC" in printed
    exams = json.loads(predictions.read_text())["exams"]
    assert len(exams) == 16
    assert all(0 <= e["malignancy_score"] <= 100 and e["birads"] in (2, 3, 4, 5) for e in exams)
    assert sum(e["malignant"] for e in exams) == 8

    other = write_config(tmp_path / "bilateral.toml", bilateral=True)
    assert main([*predict, "--config", other]) == 2
    assert "data.bilateral = True, but" in capsys.readouterr().err
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray((out / "best.safetensors").read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert main(["predict", site_dir, "--weights", str(damaged)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    # weights from before grey-level harmonisation (no version recorded): their inputs no longer exist
    older = tmp_path / "older.safetensors"
    best = load_checkpoint(out / "best.safetensors")
    save_checkpoint(older, best.tensors, {k: v for k, v in best.metadata.items() if k != "inputs"})
    assert main(["predict", site_dir, "--weights", str(older)]) == 2
    expected = f"preprocessing version 1, but this fedmammo makes version {INPUTS_VERSION}"
    assert expected in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_weights(site_dir, tmp_path, monkeypatch, capsys) -> None:
    config = write_config(tmp_path / "c.toml", size=32)  # the smallest input: this test trains 5 epochs
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", site_dir, "--config", config, "--out", str(whole)]) == 0

    # Killed after training epoch 2, before its checkpoint: the run must restart epoch 2 from epoch 1's.
    evaluate, calls = client.train.evaluate, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(client.train, "evaluate", dies_in_epoch_2)
    assert main(["train", site_dir, "--config", config, "--out", str(killed)]) == 130
    monkeypatch.setattr(client.train, "evaluate", evaluate)
    assert (killed / "checkpoints" / "latest").read_text() == "epoch_001.safetensors\n"

    changed = write_config(tmp_path / "changed.toml", lr=1e-3, size=32)
    assert main(["train", site_dir, "--config", changed, "--out", str(killed), "--resume"]) == 2
    assert "train.lr = 0.0003 (now 0.001)" in capsys.readouterr().err

    assert main(["train", site_dir, "--config", config, "--out", str(killed), "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().err
    for name in ("checkpoints/epoch_002.safetensors", "best.safetensors"):
        a, b = load_checkpoint(whole / name).tensors, load_checkpoint(killed / name).tensors
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    histories = [json.loads((out / "metrics.json").read_text())["history"] for out in (whole, killed)]
    assert [h["val"] for h in histories[0]] == [h["val"] for h in histories[1]]


def test_train_and_predict_from_dicom(tmp_path, capsys) -> None:
    """The real chain: DICOM files → prepare_site → training → prediction, with a broken file skipped."""
    root = tmp_path / "hospital"
    write_site(root, 6)
    (root / "broken.dcm").write_bytes(b"\0" * 300)
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(bilateral="false", lr=3e-4, size=64).replace("[64, 64]", "[64, 48]")
                      .replace("epochs = 2", "epochs = 1"))
    out = tmp_path / "run"
    assert main(["train", str(root), "--config", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "6 exams (train 2, val 2, test 2), 1 rejected" in err and "broken.dcm" in err
    assert json.loads((out / "metrics.json").read_text())["exams"] == {"train": 2, "val": 2, "test": 2}
    predictions = tmp_path / "p.json"
    weights = str(out / "best.safetensors")
    assert main(["predict", str(root), "--weights", weights, "--split", "all", "--json",
                 str(predictions)]) == 0
    in_site = {e["exam_id"]: e for e in json.loads(predictions.read_text())["exams"]}
    assert len(in_site) == 6
    capsys.readouterr()

    # A new patient's study as a hospital exports it: no labels, other file names and layout, one breast
    # without its MLO. Each complete breast scores as it did inside the labelled site folder.
    study = tmp_path / "export" / "study"
    study.mkdir(parents=True)
    first = sorted((root / "P000").glob("*.dcm"))
    for i, path in enumerate(first):
        (study / f"IM{i:04d}").write_bytes(path.read_bytes())
    lone = next(p for p in sorted((root / "P001").glob("*.dcm")) if "_CC_" in p.name)
    (study / "lone").write_bytes(lone.read_bytes())
    new, table = tmp_path / "new.json", tmp_path / "new.csv"
    assert main(["predict", str(tmp_path / "export"), "--weights", weights, "--json", str(new),
                 "--csv", str(table)]) == 0
    printed = capsys.readouterr()
    report = json.loads(new.read_text())
    assert report["metrics"] is None and report["split"] == "all"
    scored = {e["exam_id"]: e for e in report["exams"]}
    assert list(scored) == [f"{pydicom.dcmread(first[0]).StudyInstanceUID}_L"]  # P000: one left breast
    for exam, entry in scored.items():  # to float32 rounding: other exams in the batch change kernel sums
        assert entry["malignancy_score"] == pytest.approx(in_site[exam]["malignancy_score"], abs=1e-4)
        assert entry["birads_probabilities"] == pytest.approx(in_site[exam]["birads_probabilities"], abs=1e-6)
        assert "malignant" not in entry
    assert [r["reason"].split(":")[0] for r in report["not_scored"]] == ["incomplete exam"]
    assert "not scored" in printed.err and "AUC" not in printed.out
    lines = table.read_text().splitlines()
    assert lines[0].startswith("exam_id,patient_id,study_uid,laterality,malignancy_score,birads,p_birads_2")
    assert len(lines) == 1 + len(scored)
    # the same files named one by one
    files = [str(p) for p in sorted(study.iterdir())]
    assert main(["predict", *files, "--weights", weights, "--json", str(new)]) == 0
    assert {e["exam_id"] for e in json.loads(new.read_text())["exams"]} == scored.keys()
    assert main(["predict", str(study / "lone"), "--weights", weights]) == 1
    assert "no exam with a CC and an MLO view" in capsys.readouterr().err
