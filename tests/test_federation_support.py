"""Shared pieces of the federation tests (no tests here): a small synthetic cohort made once per session,
a tiny federation config, the sites' prediction files, and an in-process Grid.

The in-process Grid hands the ServerApp's messages to the real ClientApp (the same objects `flwr run`
loads), one SuperNode context per site, so the server's and the client's code run unchanged without Ray or
a SuperLink. Each message, each reply and each site's Context goes through Flower's own serialisation on
the way, as over the network, so neither side ever holds the other's objects; the network itself is left
out, and the slow tests cover it.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import MESSAGE_TTL_TOLERANCE
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common.sites import site_folders
from common.synth.generate import CohortSpec, generate
from server.app import app as server_app
from server.settings import app_defaults

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


def through_flower(message: Message, *, reply: bool) -> Message:
    """`message` as its receiver gets it over a SuperLink: checked as the SuperLink checks it, then every
    object of it deflated to bytes and inflated again (Flower's own object serialisation, what travels
    between ServerApp, SuperLink, SuperNode and ClientApp), so the receiver holds a fresh copy, metadata
    included. The sender's side gets its message id set as `HttpGrid.push_messages` and the ClientApp
    runtime's `push_message` set it: the message's object id."""
    message.metadata.__dict__["_message_id"] = message.object_id
    # what the SuperLink stores and routes by: the message without its content, through protobuf
    header = message_from_proto(ProtoMessage.FromString(
        message_to_proto(remove_content_from_message(message)).SerializeToString()))
    errors = validate_message(header, is_reply_message=reply)
    if errors:
        raise AssertionError(f"the SuperLink would refuse this {'reply' if reply else 'message'}: {errors}")
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    received = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(received, Message)
    received.metadata.__dict__["_message_id"] = header.metadata.message_id
    return received


def check_reply(reply: Message, instruction: Message) -> None:
    """What the SuperLink's `store_message_res` checks before it keeps a reply (it drops one that fails)."""
    ins, res = instruction.metadata, reply.metadata
    problems = [what for what, wrong in (
        ("reply_to_message_id is not the instruction's id", res.reply_to_message_id != ins.message_id),
        ("src_node_id is not the instruction's dst_node_id", res.src_node_id != ins.dst_node_id),
        ("run_id differs", res.run_id != ins.run_id),
        ("TTL outlives the instruction",
         res.ttl - (ins.created_at + ins.ttl - res.created_at) > MESSAGE_TTL_TOLERANCE)) if wrong]
    if problems:
        raise AssertionError(f"the SuperLink would drop this reply: {problems}")


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are the real ClientApp called in this process; `fail` names sites whose
    ClientApp raises, as a crashed site would. Every message to a site and every reply goes through
    Flower's serialisation (`through_flower`), and so does the site's Context, as the ClientApp process
    gets it from its SuperNode and hands it back: nothing is shared between the two sides."""

    def __init__(self, run_config: dict[str, Any], sites: int, fail: Iterable[int] = ()) -> None:
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                          "num-partitions": sites}, state=RecordDict(), run_config=run_config)
                         for i in range(sites)}
        self.fail = {100 + i for i in fail}
        self.sent: list[Message] = []
        """The messages as the sites received them."""

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
            node = message.metadata.dst_node_id
            if node not in self.contexts:
                raise AssertionError(f"message to node {node}, which is not connected")
            delivered = through_flower(message, reply=False)
            self.sent.append(delivered)
            context = context_from_proto(context_to_proto(self.contexts[node]))
            try:
                if node in self.fail:
                    raise RuntimeError("site down")
                answer = client_app(delivered, context)
                self.contexts[node] = context_from_proto(context_to_proto(context))
            except Exception as exc:  # what Flower does with a ClientApp's exception
                error = Error(code=0, reason=f"{type(exc).__name__}: {exc}")
                answer = Message(error, reply_to=delivered)
            reply = through_flower(answer, reply=True)
            check_reply(reply, delivered)
            replies.append(reply)
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


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Until `condition()` holds, for at most `timeout_s` seconds (a TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)
