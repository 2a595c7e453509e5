"""Update sanity at the center (server/sanity.py): malformed, non-finite or absurd updates are left out of
the round with a reason naming the site; the run goes on with the others (in process, see
test_federation_support)."""

from __future__ import annotations

import io
import logging
from typing import ClassVar

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.task_identity import TaskIdentity
from test_federation_support import InProcessGrid, run_in_process

from common.checkpoint import load_checkpoint
from common.config import load_config
from common.model import initial_model
from common.protocol import WEIGHTS, pack_weights
from server.exchange import RoundError
from server.sanity import screen_updates
from server.state import exchanged_keys

SENT = ArrayRecord({WEIGHTS: Array(np.zeros(6, dtype=np.float32))})


def reply(site: str, weights: np.ndarray | Array | None, examples: float = 8) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples}),
                          "site": ConfigRecord({"name": site})})
    if weights is not None:
        content["arrays"] = ArrayRecord({WEIGHTS: weights if isinstance(weights, Array) else Array(weights)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def lying(data: bytes) -> Array:
    """An Array whose metadata says float32[6] whatever its data holds (a broken or hostile site's)."""
    return Array(dtype="float32", shape=(6,), stype=SType.NUMPY, data=data)


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def ok(site: str, scale: float = 1.0) -> Message:
    return reply(site, np.full(6, 0.01 * scale, dtype=np.float32))


@pytest.fixture
def flower_log(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize(("weights", "examples", "reason"), [
    (np.array([0, 0, np.nan, 0, 0, 0], dtype=np.float32), 8, "hold NaN or Inf"),
    (np.array([0, 0, np.inf, 0, 0, 0], dtype=np.float32), 8, "hold NaN or Inf"),
    (np.zeros(5, dtype=np.float32), 8, "are float32[5], expected float32[6]"),
    (np.zeros((2, 3), dtype=np.float32), 8, "are float32[2, 3], expected float32[6]"),
    (np.zeros(6, dtype=np.float64), 8, "are float64[6], expected float32[6]"),
    (None, 8, "its weights are [], expected ['weights']"),
    (lying(npy(np.zeros(5, dtype=np.float32))), 8, "hold 5 values, expected 6"),
    (lying(npy(np.zeros(6, dtype=np.float64))), 8, "are float64[6], expected one float32 array"),
    (lying(b"\x93NUMPY garbage"), 8, "not a readable numpy array"),
    (lying(npy(np.zeros(6, dtype=np.float32))[:-4]), 8, "not a readable numpy array"),
    (lying(npy(np.zeros(6, dtype=np.float32)).replace(b"(6,)", b"(-6,)")), 8, "not a readable numpy array"),
    (lying(npy(np.zeros((2, 3), dtype=np.float32)).replace(b"(2, 3)", b"(-2, -3)")), 8, "not a readable"),
    (Array(dtype="float33", shape=(6,), stype=SType.NUMPY, data=npy(np.zeros(6, dtype=np.float32))), 8,
     "unknown type 'float33'"),
    (np.zeros(6, dtype=np.float32), 0, "num-examples is 0"),
    (np.zeros(6, dtype=np.float32), float("nan"), "num-examples is nan"),
    (np.full(6, 10, dtype=np.float32), 8, "more than 10× the median"),
])
def test_a_broken_update_is_rejected_with_the_sites_name_and_the_others_kept(weights, examples, reason,
                                                                             flower_log):
    bad = reply("x", weights, examples)
    kept, rejected = screen_updates([ok("a"), bad, ok("b", 2)], SENT, "round 1", norm_factor=10)
    assert [str(r.content["site"]["name"]) for r in kept] == ["a", "b"]
    assert len(rejected) == 1 and rejected[0].startswith("site x: ") and reason in rejected[0], rejected
    assert "round 1: update rejected, the round goes on without it: site x: " in flower_log.text


def test_the_norm_cap_and_the_relative_check_are_configurable():
    updates = [ok("a"), ok("b", 3), ok("c", 40)]
    assert len(screen_updates(updates, SENT, "r", norm_factor=0)[0]) == 3  # relative check off
    assert [str(r.content["site"]["name"]) for r in screen_updates(updates, SENT, "r", norm_factor=10)[0]] \
        == ["a", "b"]
    kept, rejected = screen_updates(updates, SENT, "r", max_norm=0.1, norm_factor=0)  # .0245, .0735, .98
    assert len(kept) == 2 and rejected == ["site c: update norm 0.9798 exceeds max-update-norm 0.1"]
    assert len(screen_updates([ok("alone", 1e6)], SENT, "r", norm_factor=10)[0]) == 1  # nothing to compare


class TamperingGrid(InProcessGrid):
    """Site 2 sends NaN weights, site 3 weights blown up a thousandfold: a broken or hostile site.
    Keeps the training replies as the sites sent them, before the tampering."""

    sent_weights: ClassVar[list[tuple[int, np.ndarray]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for r in replies:
            if r.metadata.message_type == MessageType.TRAIN and not r.has_error():
                flat = r.content["arrays"][WEIGHTS].numpy().copy()
                self.sent_weights.append((r.metadata.src_node_id, flat.copy()))
                if r.metadata.src_node_id == 101:
                    flat[123] = np.nan
                if r.metadata.src_node_id == 102:
                    flat *= 1000
                r.content["arrays"] = ArrayRecord({WEIGHTS: Array(flat)})
        return replies


def test_a_run_goes_on_without_the_rejected_sites_and_fails_when_none_is_left(sites, config, tmp_path,
                                                                              flower_log):
    out = tmp_path / "run"
    run_in_process(sites, {"config": config, "num-server-rounds": 1, "local-steps": 1, "eval-every": 0,
                           "out-dir": str(out)}, grid_class=TamperingGrid)
    text = flower_log.text
    assert "round 1 training: update rejected, the round goes on without it: site site2_nordvik: weights " \
           "'weights' hold NaN or Inf" in text
    assert "site site3_kestrel: update norm" in text and "more than 10× the median" in text
    # the new global weights are site 1's alone
    first = dict(TamperingGrid.sent_weights)[100]
    keys = exchanged_keys(initial_model(load_config(config)), "average")
    stored = pack_weights(load_checkpoint(out / "checkpoints" / "round-0001.safetensors").tensors, keys)
    np.testing.assert_allclose(stored[WEIGHTS].numpy(), first, rtol=1e-6)

    with pytest.raises(RoundError, match="every update was rejected: site site1_helion: update norm"):
        run_in_process(sites, {"config": config, "num-server-rounds": 1, "local-steps": 1, "eval-every": 0,
                               "max-update-norm": 1e-9, "out-dir": str(tmp_path / "none")})
