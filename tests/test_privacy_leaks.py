"""What leaves a site, proved on a whole run (in process, see test_federation_support): every message a
site sends in training, evaluation and the statistics' query holds only the model's weights of the
exchanged size, metrics and the statistics summaries (histograms, 2×2 tables of paired calls, the BI-RADS
head's confusion matrix, sums: counts of fixed shapes) — no pixel array, no DICOM attribute value, no
case-level row — and neither do the server's log lines, nor a failing site's error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest
from flwr.app import Message, MessageType
from test_federation_support import InProcessGrid, run_in_process

import client.app
from client.site_stats import read_cases
from common.config import load_config
from common.labels import BIRADS_TARGETS
from common.model import initial_model
from common.protocol import WEIGHTS
from common.stats.scores import GRIDS
from server.state import exchanged_keys

IDENTIFYING = {"PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "DeviceSerialNumber",
               "InstitutionName", "InstitutionAddress"}
"""Attributes beyond every person name (PN), UID, date and time."""
STANDARD_UID = "1.2.840.10008."
"""DICOM's own UIDs (SOP classes, transfer syntaxes) name no one."""


def dicom_values(root: Path) -> set[str]:
    """Every person name, instance UID, date, time and identifying attribute of the cohort's files."""
    values = set()
    for path in root.rglob("*.dcm"):
        for element in pydicom.dcmread(path, stop_before_pixels=True).iterall():
            if element.VR in ("PN", "UI", "DA", "DT", "TM") or element.keyword in IDENTIFYING:
                for value in element.value if element.VM > 1 else [element.value]:
                    text = str(value).strip()
                    if text and not text.startswith(STANDARD_UID):
                        values.add(text)
    return values


def label_values(root: Path) -> set[str]:
    """The labels' patient keys and study UIDs, and the exam ids of the sites' prediction files."""
    values = set()
    for labels in root.glob("*/labels.csv"):
        for row in labels.read_text().splitlines()[1:]:
            values.update(row.split(",")[:2])
    return values


def occurring(values: set[str], text: str) -> list[str]:
    """The values found in `text` as whole tokens (a date is not a run of digits inside a float)."""
    return sorted(v for v in values if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w])", text))


class RecordingGrid(InProcessGrid):
    received: ClassVar[list[Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.received.extend(replies)
        return replies


def lists_in(value: Any) -> list[list]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in lists_in(v)]
    if isinstance(value, list):
        nested = [x for v in value for x in lists_in(v)]
        return nested + ([value] if value and all(isinstance(v, int | float) for v in value) else [])
    return []


def sent_text(reply: Message) -> str:
    """Everything a reply carries but the weights' bytes: record and key names, texts, numbers."""
    if reply.has_error():
        return reply.error.reason
    parts = []
    for name, record in reply.content.items():
        parts.append(name)
        for key, value in record.items():
            parts += [key, repr(value) if not hasattr(value, "numpy") else ""]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def run(sites, config, tmp_path_factory):
    """A 1-round run with the final evaluation and the statistics' query; every reply and log line."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    RecordingGrid.received.clear()
    out = tmp_path_factory.mktemp("leaks")
    try:
        run_in_process(sites, {"config": config, "num-server-rounds": 1, "local-steps": 1, "eval-every": 0,
                               "out-dir": str(out)}, grid_class=RecordingGrid)
    finally:
        logger.removeHandler(handler)
    return list(RecordingGrid.received), [r.getMessage() for r in records], out


@pytest.mark.slow  # the `run` fixture: a whole in-process run with evaluation and query (~1 min)
def test_training_replies_hold_only_the_exchanged_weights_and_metrics(run, config):
    replies, _, _ = run
    train = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
    size = sum(initial_model(load_config(config)).state_dict()[k].numel()
               for k in exchanged_keys(initial_model(load_config(config)), "average"))
    assert len(train) == 3
    for reply in train:
        assert set(reply.content) == {"arrays", "metrics", "site"}
        (array,) = reply.content["arrays"].values()
        assert list(reply.content["arrays"]) == [WEIGHTS]
        assert array.shape == (size,) and array.dtype == "float32"
        assert set(reply.content["site"]) == {"name"}
        assert set(reply.content["metrics"]) <= {"num-examples", "loss", "steps", "seconds", "site-weight",
                                                 "epsilon"}


@pytest.mark.slow
def test_evaluation_and_query_replies_hold_only_metrics_and_summaries(run):
    replies, _, out = run
    kinds = {r.metadata.message_type for r in replies}
    assert kinds == {MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY}
    per_case = []  # each site's columns of scores (0/1 columns could equal a histogram of counts by chance)
    for path in out.glob("sites/*/runs/*/predictions/round-0001.csv"):
        cases = read_cases(path, 50.0)
        per_case += [list(c) for r in cases.raters.values() for c in (r.scores, np.sort(r.scores))
                     if len(set(c)) > 2]
    raters = len(cases.raters)
    sizes = {len(g.values) for g in GRIDS.values()} | {raters, 1, 2, len(BIRADS_TARGETS)}
    for reply in (r for r in replies if r.metadata.message_type != MessageType.TRAIN):
        assert not reply.content.array_records  # no weights, no pixels
        site = reply.content["site"]
        assert set(site) in ({"name", "summary"}, {"name", "sums"})
        payload = json.loads(str(site.get("summary", site.get("sums"))))
        if "summary" in site:
            assert set(payload) == {"site", "loss", "birads_accuracy", "counts", "raters", "skipped",
                                    "groups"}
            for group in payload["groups"].values():  # exchange 1: histograms, 2×2 tables, confusion matrix
                assert set(group) == {"raters", "grids", "n_pos", "n_neg", "hist_pos", "hist_neg", "pairs",
                                      "birads_head"}
                assert len(group["pairs"]) == raters * (raters - 1) // 2
                for pair in group["pairs"]:
                    assert set(pair) == {"a", "b", "malignant", "benign"}
                    assert all(pair[w] is None or np.shape(pair[w]) == (2, 2)
                               for w in ("malignant", "benign"))
                head = group["birads_head"]
                assert head["categories"] == list(BIRADS_TARGETS)
                assert head["counts"] is None or np.shape(head["counts"]) == (4, 4)
        # no case-level row: every list of numbers is a histogram on a fixed grid or one value per rater,
        # and none is a site's column of scores
        vectors = lists_in(payload)
        assert {len(v) for v in vectors} <= sizes
        assert not [v for v in vectors if any(len(v) == len(c) and np.allclose(v, c) for c in per_case)]


@pytest.mark.slow
def test_no_dicom_value_patient_key_or_exam_id_in_anything_sent_or_logged(run, sites):
    replies, log_lines, out = run
    exams = {row.split(",")[0] for path in out.glob("sites/*/runs/*/predictions/*.csv")
             for row in path.read_text().splitlines()[1:]}
    values = dicom_values(sites) | label_values(sites) | exams
    assert len(values) > 100 and any(v.startswith("SYNTHETIC^") for v in values)
    assert occurring(values, "\n".join(sent_text(r) for r in replies)) == []
    # The run token (`server.state`: the start time and random hex) is the center's own, not patient data,
    # but its time digits may match a DICOM time (StudyTime 094200 once did): it is taken out first.
    logged = re.sub(r"\d{8}-\d{6}-[0-9a-f]{6}", "<run>", "\n".join(log_lines))
    assert occurring(values, logged) == []
    cases = read_cases(next(out.glob("sites/*/runs/*/predictions/round-0001.csv")), 50.0)
    assert len(cases.truth) == 8  # the rows these checks guard are there, at the site


def test_a_failing_sites_error_reaches_the_center_without_patient_data(sites, config, tmp_path, monkeypatch):
    patient = next(p for p in (sites / "site1_helion").iterdir() if p.is_dir())
    dicom = next(patient.rglob("*.dcm"))
    name = str(pydicom.dcmread(dicom, stop_before_pixels=True).PatientName)

    def broken(*args, **kwargs):
        raise ValueError(f"{dicom}: pixel data unreadable ({name}, 20200223, 'S1P0009')")

    monkeypatch.setattr(client.app, "exam_set", broken)
    RecordingGrid.received.clear()
    with pytest.raises(RuntimeError, match="no site replied"):
        run_in_process(sites, {"config": config, "num-server-rounds": 1, "local-steps": 1,
                               "out-dir": str(tmp_path)}, grid_class=RecordingGrid)
    reasons = [r.error.reason for r in RecordingGrid.received if r.has_error()]
    assert len(reasons) == 3
    assert "site site1_helion: <path> pixel data unreadable <value> <value>, '…')" in "\n".join(reasons)
    assert occurring(dicom_values(sites) | label_values(sites), "\n".join(reasons)) == []
    assert all(patient.name not in r for r in reasons)


def test_a_reader_column_that_cannot_be_read_is_skipped_without_quoting_its_cells(tmp_path, caplog):
    path = tmp_path / "round-0001.csv"
    path.write_text("exam_id,malignant,density,symptomatic,birads,model,model-birads,reader_x\n"
                    "S1P0009_R,1,c,0,4,71.5,4,4\n"
                    "S1P0010_L,0,b,0,,12.0,2,Jane Doe 19610203\n")
    with caplog.at_level(logging.WARNING, logger="client.site_stats"):
        cases = read_cases(path, 50.0)
    reason = cases.skipped["reader_x"]
    assert "Jane" not in reason and "1961" not in reason and "line 3" in reason, reason
    assert "Jane Doe 19610203" in caplog.text  # the site's own log has it
