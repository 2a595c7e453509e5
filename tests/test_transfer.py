"""Half-precision transfer (run config `transfer-dtype`): the weights go out and the updates come back in
bfloat16 or float16, half the bytes of float32 through Flower's own serialisation; representable values
travel exactly; the center decodes, screens and clips the updates and keeps its master copy in float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
from test_federation_support import InProcessGrid, run_in_process, through_flower

from common.checkpoint import load_checkpoint
from common.protocol import (
    ARRAYS,
    UPDATE,
    WEIGHTS,
    ProtocolError,
    decode,
    encode,
    pack_weights,
    unpack_weights,
)
from server.sanity import screen_updates

HALF = ["bfloat16", "float16"]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """What a ServerApp or ClientApp process has set when it makes messages."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def wire_bytes(message: Message) -> int:
    """The bytes of every object of a message as Flower serialises it to send it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_halves_the_bytes_on_the_wire_and_keeps_representable_values_exactly(dtype):
    torch.manual_seed(0)
    state = {"a": torch.randn(300, 1000), "b": torch.randn(7)}
    sizes = {}
    for kind in ("float32", dtype):
        message = Message(RecordDict({ARRAYS: pack_weights(state, ["a", "b"], kind)}), dst_node_id=7,
                          message_type=MessageType.TRAIN)
        sizes[kind] = wire_bytes(message)
        received = through_flower(message, reply=False)
        back = unpack_weights(received.content[ARRAYS], ["a", "b"], state)
        rounded = {k: v.to(getattr(torch, kind)).float() for k, v in state.items()}  # round to nearest
        assert all(torch.equal(back[k], rounded[k]) for k in state)
        # values the type represents come back exactly, extremes and signed zeros included
        again = unpack_weights(pack_weights(back, ["a", "b"], kind), ["a", "b"], state)
        assert all(torch.equal(again[k], back[k]) for k in state)
    assert sizes[dtype] / sizes["float32"] == pytest.approx(0.5, abs=0.002), sizes
    extremes = torch.tensor([0.0, -0.0, 1.0, -2.5, torch.finfo(getattr(torch, dtype)).max,
                             torch.finfo(getattr(torch, dtype)).tiny])
    assert torch.equal(torch.from_numpy(decode(encode(extremes, dtype))), extremes)


def test_a_malformed_half_precision_array_is_one_clear_error():
    good = encode(torch.ones(4), "bfloat16")
    with pytest.raises(ProtocolError, match=r"weights are bfloat16\[5\] in 8 bytes"):
        decode(Array(dtype="bfloat16", shape=(5,), stype=good.stype, data=good.data))
    with pytest.raises(ProtocolError, match=r"weights are int8\[8\]"):
        decode(Array(dtype="int8", shape=(8,), stype=good.stype, data=good.data))
    with pytest.raises(ProtocolError, match=r"weights are float64\[4\], expected one float32 array"):
        decode(Array(np.ones(4)))


SENT = ArrayRecord({WEIGHTS: Array(np.full(6, 0.5, dtype=np.float32))})


def half_reply(site: str, update: torch.Tensor, dtype: str = "bfloat16") -> Message:
    return Message(RecordDict({ARRAYS: ArrayRecord({UPDATE: encode(update, dtype)}),
                               "metrics": MetricRecord({"num-examples": 8}),
                               "site": ConfigRecord({"name": site})}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def test_the_center_screens_and_clips_decoded_updates_and_aggregates_float32_weights():
    small, large = torch.full((6,), 0.01), torch.full((6,), 0.04)
    replies = [half_reply("a", small), half_reply("b", large, "float16"), half_reply("c", torch.ones(5)),
               half_reply("d", torch.tensor([0, 0, float("nan"), 0, 0, 0]))]
    kept, rejected = screen_updates(replies, SENT, "r", norm_factor=0, clip_to=0.05)
    assert [str(r.content["site"]["name"]) for r in kept] == ["a", "b"]
    assert rejected == ["site c: its update holds 5 values, expected 6",
                        "site d: weights 'weights' hold NaN or Inf (or exceed the float32 range)"]
    a, b = (r.content[ARRAYS][WEIGHTS].numpy() for r in kept)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, 0.5 + small.to(torch.bfloat16).float().numpy())  # not clipped
    update_b = b - 0.5  # ‖(0.04, …)‖ = 0.098 clipped to 0.05 after decoding
    assert np.linalg.norm(update_b) == pytest.approx(0.05, rel=1e-5)


class RecordingGrid(InProcessGrid):
    """Records the type and name of the weights in each message as the center sends it and in each reply
    as the center receives it."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.wire = [*getattr(self, "wire", []), *((m.metadata.message_type, name, array.dtype)
                                                   for m in messages if ARRAYS in m.content.array_records
                                                   for name, array in m.content[ARRAYS].items())]
        replies = super().send_and_receive(messages, timeout=timeout)
        self.wire += [("reply", name, array.dtype) for r in replies if ARRAYS in r.content.array_records
                      for name, array in r.content[ARRAYS].items()]
        return replies


def test_a_federation_with_bfloat16_transfer_runs_to_its_report_and_keeps_float32_weights(sites, config,
                                                                                          tmp_path):
    grid = run_in_process(sites, {"config": config, "num-server-rounds": 2, "local-steps": 1, "eval-every": 1,
                                  "transfer-dtype": "bfloat16", "out-dir": str(tmp_path)},
                          grid_class=RecordingGrid)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["run"]["run-config"]["transfer-dtype"] == "bfloat16" and len(report["sites"]) == 3
    # 2 rounds × 3 sites: global weights out, updates back in bfloat16, round 1's evaluation too; the final
    # evaluation scores exactly the float32 model the center keeps
    expected = [("train", WEIGHTS, "bfloat16")] * 6 + [("reply", UPDATE, "bfloat16")] * 6
    evaluations = [("evaluate", WEIGHTS, "bfloat16")] * 3 + [("evaluate", WEIGHTS, "float32")] * 3
    assert sorted(grid.wire) == sorted(expected + evaluations)
    # the master copy accumulates the decoded updates in float32: it is not on bfloat16's grid
    master = load_checkpoint(tmp_path / "checkpoints" / "round-0002.safetensors").tensors
    weights = master["malignancy.weight"]
    assert weights.dtype == torch.float32 and not torch.equal(weights, weights.bfloat16().float())
