"""Shared pieces of the federation tests (no tests here): a small synthetic cohort made once per session,
a tiny federation config, the sites' prediction files, and an in-process Grid.

The in-process Grid hands the ServerApp's messages straight to the real ClientApp (the same objects
`flwr run` loads), one SuperNode context per site, so the server's and the client's code run unchanged
without Ray or a SuperLink; only the transport is left out, and the slow tests cover that.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common.sites import site_folders
from common.synth.generate import CohortSpec, generate
from server.app import app as server_app
from server.launch import app_defaults

TINY_CONFIG = """\
[data]
image_size = [64, 64]
workers = 1
cache_dir = "{cache}"

[train]
batch_size = 4
num_threads = 1
augment = false
"""


def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sites (distinct vendors), 8 training and 8 test exams each; made once a session."""
    root = tmp_path_factory.getbasetemp() / "federation-cohort"
    if not (root / "cohort.json").is_file():
        generate(CohortSpec(train=(8, 8, 8), val=(2, 2, 2), test=(8, 8, 8), seed=3), root, workers=2,
                 progress=False)
    return root


def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64×64 views, batch 4, one thread; the decoded views are cached for the whole session."""
    base = tmp_path_factory.getbasetemp()
    path = base / "federation-tiny.toml"
    if not path.is_file():
        path.write_text(TINY_CONFIG.format(cache=base / "federation-cache"))
    return path


def predictions(out: Path, round_: int) -> list[dict[str, str]]:
    """Every site's prediction file of `round_` under a simulation's `out-dir`, concatenated."""
    rows = []
    for path in sorted(out.glob(f"sites/*/runs/*/predictions/round-{round_:04d}.csv")):
        with path.open(newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def truth_and(rows: list[dict[str, str]], column: str) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r["malignant"] == "1" for r in rows]), np.array([float(r[column]) for r in rows])


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are the real ClientApp called in this process; `fail` names sites whose
    ClientApp raises, as a crashed site would."""

    def __init__(self, run_config: dict[str, Any], sites: int, fail: Iterable[int] = ()) -> None:
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                          "num-partitions": sites}, state=RecordDict(), run_config=run_config)
                         for i in range(sites)}
        self.fail = {100 + i for i in fail}
        self.ids = itertools.count(1)
        self.sent: list[Message] = []

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            meta = message.metadata
            delivered = Message(content=message.content, metadata=Metadata(
                run_id=1, message_id=str(next(self.ids)), src_node_id=1, dst_node_id=meta.dst_node_id,
                reply_to_message_id="", group_id=meta.group_id, created_at=time.time(), ttl=meta.ttl,
                message_type=meta.message_type, src_task_id=1, dst_task_id=2))
            self.sent.append(delivered)
            try:
                if meta.dst_node_id in self.fail:
                    raise RuntimeError("site down")
                replies.append(client_app(delivered, self.contexts[meta.dst_node_id]))
            except Exception as exc:  # what Flower does with a ClientApp's exception
                error = Error(code=0, reason=f"{type(exc).__name__}: {exc}")
                replies.append(Message(error, reply_to=delivered))
        return replies


def run_in_process(data_root: Path, run_config: dict[str, Any], fail: Iterable[int] = (),
                   grid_class: Callable[..., InProcessGrid] = InProcessGrid) -> InProcessGrid:
    """Run the real ServerApp against the real ClientApps of `data_root`'s sites, in this process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    config = {**app_defaults(), **run_config, "data-root": str(data_root)}
    grid = grid_class(config, len(site_folders(data_root)), fail)
    threads = torch.get_num_threads()  # the apps set their own; other tests keep this process's
    try:
        server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config))
    finally:
        torch.set_num_threads(threads)
    return grid

