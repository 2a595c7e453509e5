"""Sites that drop out of a round, in process (the real ServerApp and ClientApps, no transport): a silent
site is named missing in the round's metrics, the run goes on while `min-nodes` sites answer, and the site
rejoins under a new node id. The same with real SuperLink / SuperNode processes is in
test_reliability_processes.py."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_federation_support import InProcessGrid, predictions, run_in_process, truth_and

from common.checkpoint import latest_checkpoint
from common.protocol import MODEL
from common.stats import auc_ci
from server.attendance import Attendance
from server.exchange import RoundError


def metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def present(rows: list[dict[str, str]], server_round: int, phase: str = "train") -> set[str]:
    return {r["site"] for r in rows if r["round"] == str(server_round) and r["phase"] == phase
            and not r["missing"]}


def missing(rows: list[dict[str, str]], server_round: int, phase: str = "train") -> set[str]:
    return {r["site"] for r in rows if r["round"] == str(server_round) and r["phase"] == phase
            and r["missing"] == "1"}


class SilentGrid(InProcessGrid):
    """Sites (by index) that answer nothing in given exchanges, as a dead SuperNode or one slower than the
    round's timeout; `restart` gives a site a new node id after an exchange, its old id staying connected
    but silent (the SuperLink notices a killed SuperNode only when its heartbeat expires)."""

    def __init__(self, run_config: dict[str, Any], sites: int, fail: Iterable[int] = (), *,
                 silent: dict[int, set[int]], restart: dict[int, int] | None = None) -> None:
        super().__init__(run_config, sites, fail)
        self.silent = silent
        """exchange number (from 1) → indices of the sites that do not answer it."""
        self.restart = restart or {}
        """exchange number → index of the site that comes back under a new node id after it."""
        self.exchange = 0
        self.dead: set[int] = set()

    def get_node_ids(self) -> list[int]:
        return sorted([*self.contexts, *self.dead])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.exchange += 1
        quiet = {100 + i for i in self.silent.get(self.exchange, ())} | self.dead
        replies = super().send_and_receive([m for m in messages if m.metadata.dst_node_id not in quiet],
                                           timeout=timeout)
        if (index := self.restart.get(self.exchange)) is not None:
            old = self.contexts.pop(100 + index)
            self.dead.add(100 + index)
            self.contexts[200 + index] = Context(run_id=1, node_id=200 + index, node_config=old.node_config,
                                                 state=RecordDict(), run_config=old.run_config)
        return replies


def test_a_silent_site_is_named_missing_and_rejoins_under_a_new_node_id(sites, config, tmp_path):
    # round 2 training: the second site is down; for round 3 it is back, as a new SuperNode
    grid_class = functools.partial(SilentGrid, silent={2: {1}}, restart={2: 1})
    grid = run_in_process(sites, {"config": config, "num-server-rounds": 3, "local-steps": 1, "eval-every": 0,
                                  "out-dir": str(tmp_path)}, grid_class=grid_class)
    rows, everyone = metrics(tmp_path), {"site1_helion", "site2_nordvik", "site3_kestrel"}
    assert present(rows, 1) == everyone | {"all"} and missing(rows, 1) == set()
    assert present(rows, 2) == everyone - {"site2_nordvik"} | {"all"}
    assert missing(rows, 2) == {"site2_nordvik"}
    # back under node 201 while its old node 101 is still listed, silent: present, not missing
    assert 101 in grid.get_node_ids() and 201 in grid.get_node_ids()
    assert present(rows, 3) == everyone | {"all"} and missing(rows, 3) == set()
    assert present(rows, 3, "evaluate") == everyone | {"all"}
    assert latest_checkpoint(tmp_path / "checkpoints").name == "round-0003.safetensors"
    assert "- round 2 train: site2_nordvik" in (tmp_path / "report" / "report.md").read_text()


def test_too_few_sites_stop_the_round_without_a_checkpoint_and_resume_goes_on(sites, config, tmp_path):
    grid_class = functools.partial(SilentGrid, silent={2: {1, 2}})
    run = {"config": config, "num-server-rounds": 2, "local-steps": 1, "eval-every": 0, "min-nodes": 2,
           "out-dir": str(tmp_path)}
    with pytest.raises(RoundError, match=r"round 2 training: only 1 site\(s\) replied \(site1_helion; "
                                         r"missing: site2_nordvik, site3_kestrel\), min-nodes is 2"):
        run_in_process(sites, run, grid_class=grid_class)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "round-0001.safetensors"
    run_in_process(sites, {**run, "resume": True})  # every site back
    rows = metrics(tmp_path)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "round-0002.safetensors"
    assert present(rows, 1) == present(rows, 2) == {"site1_helion", "site2_nordvik", "site3_kestrel", "all"}


def _reply(node: int, site: str) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a ServerApp's messages
    message = Message(RecordDict(), dst_node_id=node, message_type="train")
    message.metadata.__dict__["_message_id"] = str(node)
    return Message(RecordDict({"site": ConfigRecord({"name": site})}), reply_to=message)


def test_attendance_names_sites_and_counts_a_restarted_one_once():
    attendance = Attendance([{"phase": "train", "site": "a"}, {"phase": "train", "site": "all"}])
    assert attendance.missing([1, 2], [_reply(1, "a"), _reply(2, "b")], True) == []
    assert attendance.missing([1, 2], [_reply(1, "a")], True) == ["b"]
    assert attendance.missing([1], [_reply(1, "a")], True) == ["b"]  # b not even connected
    assert attendance.missing([1], [_reply(1, "a")], False) == []  # b not sampled: not missing
    assert attendance.missing([1, 7], [_reply(1, "a")], True) == ["b"]  # node 7: b under a new id
    assert attendance.missing([1, 7, 2], [_reply(1, "a"), _reply(7, "b"), _reply(2, "b2")], True) == []
    assert attendance.missing([1, 2, 7, 9], [_reply(1, "a"), _reply(2, "b2"), _reply(7, "b")], True) == [
        "node 9"]  # a new SuperNode that never answered


def _relabel(site: Path, change) -> None:
    """Rewrite a site's labels.csv, each row through `change(row) -> row or None` (None drops it)."""
    with (site / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, [r for row in reader if (r := change(dict(row))) is not None]
    with (site / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def test_a_site_with_one_class_or_few_exams_is_not_estimable_and_the_pooled_statistics_stay_exact(
        sites, config, tmp_path, caplog):
    root = tmp_path / "sites"
    shutil.copytree(sites, root)
    # site3: every test exam benign; site2: one training exam and two test exams (one of each class)
    _relabel(root / "site3_kestrel", lambda r: {**r, "pathology": "benign"} if r["split"] == "test" else r)
    kept: dict[str, list[str]] = {"train": [], "test": []}

    def few(row: dict[str, str]) -> dict[str, str] | None:
        chosen = kept.get(row["split"])
        if chosen is None:
            return None
        wanted = {"train": [None], "test": ["malignant", "benign"]}[row["split"]]
        if len(chosen) < len(wanted) and row["pathology"] not in chosen and (
                wanted[0] is None or row["pathology"] in wanted):
            chosen.append(row["pathology"])
            return row
        return None

    _relabel(root / "site2_nordvik", few)
    out = tmp_path / "out"
    run_in_process(root, {"config": config, "num-server-rounds": 1, "local-steps": 1, "out-dir": str(out)})

    report = json.loads((out / "report" / "report.json").read_text())
    evaluation = report["evaluation"]
    for site, n_pos, n_neg in (("site3_kestrel", 0, 8), ("site2_nordvik", 1, 1)):
        table = evaluation["subgroups"][f"site={site}"]
        assert (table["n_pos"], table["n_neg"]) == (n_pos, n_neg)
        assert table["raters"][MODEL]["auc_ci"] is None
        assert any(f"site {site}: {n_pos} malignant and {n_neg} benign test exams" in r.getMessage()
                   and "not estimable" in r.getMessage() for r in caplog.records)
    assert evaluation["subgroups"]["site=site3_kestrel"]["raters"][MODEL]["auc"] is None  # one class
    # the pooled figures are those of all sites' cases together, the odd sites' included
    rows = predictions(out, 1)
    assert len(rows) == 8 + 2 + 8
    truth, scores = truth_and(rows, MODEL)
    auc, low, high = auc_ci(truth, scores)
    assert evaluation["raters"][MODEL]["auc"] == pytest.approx(auc, abs=1e-12)
    assert evaluation["raters"][MODEL]["auc_ci"] == pytest.approx([low, high], abs=1e-12)
    trained = {r["site"]: r for r in metrics(out) if r["phase"] == "train"}
    assert trained["site2_nordvik"]["n"] == "1"  # one exam is few, but it trains
