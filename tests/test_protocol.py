"""The wire protocol (`common.protocol`): instructions and replies built by one side are read back by the
other as they were sent, through Flower's own serialisation, and a malformed one is one clear error."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_federation_support import through_flower

from common.protocol import (
    ARRAYS,
    CONFIG,
    SUMMARY,
    EvaluateInstruction,
    ProtocolError,
    TrainInstruction,
    TrainReport,
    evaluate_reply,
    instruction,
    pack_weights,
    site_name,
    site_payload,
    train_reply,
    train_report,
    unpack_weights,
)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """What a ServerApp or ClientApp process has set when it makes messages."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _sent(content: RecordDict) -> Message:
    return through_flower(Message(content=content, dst_node_id=7, message_type="train"), reply=False)


def _wire(reply: Message) -> Message:
    return through_flower(reply, reply=True)


def test_a_train_instruction_and_its_reply_round_trip():
    task = TrainInstruction(fedmammo_config="[train]\n", run_token="t", weight_keys=["a", "b"],
                            local_epochs=1, local_steps=0, num_server_rounds=5, central_dp="client-fixed")
    record = task.record()
    record["server-round"], record["proximal-mu"] = 3, 0.1  # what Flower's FedProx adds
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0])}
    received = _sent(RecordDict({ARRAYS: pack_weights(state, task.weight_keys), CONFIG: record}))
    parsed = instruction(received, TrainInstruction)
    assert parsed.server_round == 3 and parsed.proximal_mu == pytest.approx(0.1)
    assert parsed.weight_keys == ["a", "b"] and parsed.num_server_rounds == 5
    weights = unpack_weights(received.content[ARRAYS], parsed.weight_keys, state)
    assert all(torch.equal(weights[k], state[k]) for k in state)

    report = TrainReport(num_examples=12, loss=0.5, steps=3, seconds=1.5, extra={"epsilon": 2.0})
    reply = _wire(train_reply(received, "site1", pack_weights(state, ["a"]), report))
    assert site_name(reply) == "site1"
    assert train_report(reply) == report and train_report(reply).epsilon == 2.0


def test_an_evaluate_reply_carries_its_summary_and_the_query_keeps_the_instruction():
    task = EvaluateInstruction(fedmammo_config="", run_token="t", weight_keys=[], server_round=2,
                               stats_min_count=5)
    query = task.query('{"all": {}}')
    assert query.stats_min_count == 5 and query.server_round == 2 and query.pooled == '{"all": {}}'
    received = _sent(RecordDict({CONFIG: ConfigRecord(task.values())}))
    reply = _wire(evaluate_reply(received, "site2", 10, 0.25, {"counts": {"test": 10}}))
    assert site_payload(reply, SUMMARY) == {"counts": {"test": 10}}


def test_a_malformed_message_is_one_clear_error():
    record = TrainInstruction(fedmammo_config="", run_token="t", weight_keys=["a"], local_epochs=1,
                              local_steps=0, num_server_rounds=1).record()
    del record["weight-keys"]
    with pytest.raises(ProtocolError, match="train instruction: no 'weight-keys'"):
        instruction(_sent(RecordDict({CONFIG: record})), TrainInstruction)
    record["weight-keys"], record["local-epochs"] = ["a"], "one"
    with pytest.raises(ProtocolError, match="train instruction: local-epochs = 'one': expected int"):
        instruction(_sent(RecordDict({CONFIG: record})), TrainInstruction)
    with pytest.raises(ProtocolError, match="no 'config' record"):
        instruction(_sent(RecordDict({})), TrainInstruction)


def test_weights_that_do_not_fit_the_model_are_refused():
    state = {"a": torch.zeros(4)}
    with pytest.raises(ProtocolError, match="hold 4 values; this model's 1 tensors hold 5"):
        unpack_weights(pack_weights(state, ["a"]), ["a"], {"a": torch.zeros(5)})
    with pytest.raises(ProtocolError, match="do not fit this model"):
        unpack_weights(pack_weights(state, ["a"]), ["b"], {"a": torch.zeros(4)})
