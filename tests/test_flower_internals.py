"""The parts of Flower that fedmammo relies on beyond its documented API, checked in one place, so that a
Flower upgrade that moves one fails here, by name, rather than deep inside a federation test or at a
hospital. docs/flower-internals.md lists each with its place in Flower's source (1.42).

Fast: no training, no ClientApp; a two-element ArrayRecord and a stub Grid.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import MESSAGE_TTL_TOLERANCE, SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.utils.validator import validate_message
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    Strategy,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace, compute_stdv
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.superexec import run_superexec as flower_superexec
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

WEIGHTS = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[3.0]], np.float32)}


class Nodes(Grid):
    """Two connected nodes; all a strategy's `configure_train` asks of a Grid."""

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any: ...

    def create_message(self, *args: Any, **kwargs: Any) -> Message: ...

    def get_node_ids(self) -> Iterable[int]:
        return [100, 101]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return []


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp


def arrays(shift: float = 0.0) -> ArrayRecord:
    return ArrayRecord({k: Array(v + shift) for k, v in WEIGHTS.items()})


def one_round(strategy: Strategy, server_round: int = 1) -> ArrayRecord:
    """configure_train, then each node replies with the weights moved by +1 (node 100) and +3 (node 101)."""
    sent = list(strategy.configure_train(server_round, arrays(), ConfigRecord({}), Nodes()))
    assert sorted(m.metadata.dst_node_id for m in sent) == [100, 101]
    shift = {100: 1.0, 101: 3.0}
    replies = [Message(RecordDict({"arrays": arrays(shift[m.metadata.dst_node_id]),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=m) for m in sent]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return aggregated


# --- strategy state that server/state.py checkpoints and restores ---------------------------------------

def test_fedadam_keeps_its_moments_as_m_t_and_v_t_by_array_name():
    strategy = FedAdam(min_available_nodes=2, min_train_nodes=2)
    assert strategy.m_t is None and strategy.v_t is None
    one_round(strategy)
    for moments in (strategy.m_t, strategy.v_t):
        assert isinstance(moments, dict) and list(moments) == list(WEIGHTS)
        assert all(moments[k].shape == v.shape for k, v in WEIGHTS.items())
    # restored as server/state.py restores them (a dict of arrays), the next round goes on from them
    strategy.m_t = {k: np.asarray(v) for k, v in strategy.m_t.items()}
    before = {k: v.copy() for k, v in strategy.v_t.items()}
    one_round(strategy, 2)
    assert all(np.all(strategy.v_t[k] >= before[k]) for k in WEIGHTS)


def test_fedavgm_keeps_its_momentum_as_a_list_in_array_order():
    strategy = FedAvgM(min_available_nodes=2, min_train_nodes=2, server_momentum=0.9)
    assert strategy.momentum_vector is None
    one_round(strategy)
    assert isinstance(strategy.momentum_vector, list) and len(strategy.momentum_vector) == len(WEIGHTS)
    np.testing.assert_allclose(strategy.momentum_vector[0], [-2.0, -2.0])  # old − mean of the replies
    # FedAvgM also keeps the weights it last returned (`current_arrays`) and, after round 1, starts from
    # them rather than from the weights `configure_train` is given (see docs/flower-internals.md)
    assert isinstance(strategy.current_arrays, ArrayRecord)


@pytest.mark.parametrize("wrapper", ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"])
def test_dp_wrappers_hold_the_inner_strategy_as_strategy_and_expose_their_noise(wrapper):
    inner = FedAdam()
    if wrapper.endswith("fixed"):  # as server/privacy.py builds them
        cls = {"server-fixed": DifferentialPrivacyServerSideFixedClipping,
               "client-fixed": DifferentialPrivacyClientSideFixedClipping}[wrapper]
        dp = cls(inner, 1.0, 0.5, 3)
    else:
        cls = {"server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
               "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping}[wrapper]
        dp = cls(inner, 1.0, 3, initial_clipping_norm=0.5, clipped_count_stddev=1.0)
        assert dp.clipped_count_stddev == 1.0
    assert dp.strategy is inner
    assert dp.clipping_norm == 0.5 and dp.noise_multiplier > 0
    assert inner.weighted_by_key == "num-examples"  # the fixed wrappers read it from the inner strategy


def test_dp_noise_helpers_and_the_clipping_mods_keys():
    values = [np.zeros(1000)]
    add_gaussian_noise_inplace(values, compute_stdv(1.0, 0.5, 4))
    assert 0.08 < values[0].std() < 0.17  # z·C/n = 0.125
    assert KEY_CLIPPING_NORM == "clipping_norm"
    for mod in (fixedclipping_mod, adaptiveclipping_mod, secaggplus_mod):
        assert list(inspect.signature(mod).parameters) == ["msg", "ctxt", "call_next"]


# --- SecAgg+ on the legacy path (server/secagg.py, client/secagg.py) -----------------------------------

def test_the_secagg_constants_and_the_legacy_records_keep_their_names():
    assert RECORD_KEY_CONFIGS == "secaggplus_configs"
    assert SecAggKey.MASKED_PARAMETERS == "masked_params"
    assert (MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, WorkflowKey.CURRENT_ROUND) == \
        ("config", "parameters", "current_round")
    # client/secagg.py reads these two records of the fit instruction and answers with a FitRes
    fitins = fitins_to_recorddict(FitIns(ndarrays_to_parameters([WEIGHTS["a"]]), {"x": 1}), True)
    assert set(fitins.array_records) == {"fitins.parameters"}
    assert set(fitins.config_records) == {"fitins.config"}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([WEIGHTS["a"]]), 4, {"loss": 0.5})
    record = fitres_to_recorddict(fitres, keep_input=False)
    (back,) = record.array_records["fitres.parameters"].to_numpy_ndarrays()
    np.testing.assert_array_equal(back, WEIGHTS["a"])
    assert parameters_to_ndarrays(ndarrays_to_parameters([back]))[0].tolist() == [1.0, 2.0]


def test_the_secagg_workflow_and_the_legacy_context_take_what_server_secagg_passes():
    parameters = inspect.signature(SecAggPlusWorkflow).parameters
    assert list(parameters)[:2] == ["num_shares", "reconstruction_threshold"]
    assert {"max_weight", "clipping_range", "quantization_range", "timeout"} <= set(parameters)
    SecAggPlusWorkflow(1.0, 2 / 3, max_weight=16.0, clipping_range=8.0, quantization_range=2**24, timeout=60)
    relay = FedAvg()  # server/secagg.py passes its own legacy Strategy subclass
    server = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(server, config=ServerConfig(num_rounds=1), strategy=relay,
                           client_manager=SimpleClientManager())
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    assert legacy.strategy is relay
    assert GridClientProxy(100, Nodes(), 1).node_id == 100


# --- the SuperExec that client/superexec.py replaces the executor of -----------------------------------

def test_superexec_builds_its_executor_through_a_module_level_get_executor():
    assert callable(flower_superexec.get_executor)
    assert "get_executor(" in inspect.getsource(flower_superexec.run_superexec)  # looked up at call time
    parameters = inspect.signature(flower_superexec.run_superexec).parameters
    assert {"runtime_api_address", "insecure", "root_certificates_path", "parent_pid",
            "runtime_dependency_install"} <= set(parameters)


def test_the_subprocess_executor_and_the_execution_spec_are_as_client_superexec_uses_them():
    assert SubprocessExecutor.__init__ is object.__init__  # WarmExecutor does not call it
    for method in ("launch", "reconcile", "close", "get_eligible_capacity", "wait_for_capacity"):
        assert callable(getattr(SubprocessExecutor, method)), method
    fields = {f.name for f in dataclasses.fields(ExecutionSpec)}
    assert {"task_type", "task_id", "runtime_api_address", "token", "insecure", "root_certificates_path",
            "parent_pid", "runtime_dependency_install"} <= fields
    assert LaunchResult.accepted().status == "accepted"
    assert TaskType.CLIENT_APP
    assert list(inspect.signature(run_clientapp).parameters) == [
        "runtime_api_address", "token", "insecure", "certificates", "parent_pid",
        "runtime_dependency_install"]
    assert validate_and_resolve_root_certificates(None, True) is None


def test_client_app_handlers_take_mods():
    for handler in (ClientApp.train, ClientApp.evaluate, ClientApp.query):
        assert "mods" in inspect.signature(handler).parameters


# --- what the tests' in-process Grid (test_federation_support.py) builds on ----------------------------

def test_grid_is_the_interface_the_in_process_grid_implements():
    assert Grid.__abstractmethods__ == {"set_run", "run", "create_message", "get_node_ids", "push_messages",
                                        "pull_messages", "send_and_receive"}
    # Flower 1.43 renames pull_messages' argument to `reply_to_message_ids` (`message_ids` stays, deprecated)
    assert list(inspect.signature(Grid.pull_messages).parameters) == ["self", "message_ids"]
    assert "timeout" in inspect.signature(Grid.send_and_receive).parameters


def test_a_message_survives_flowers_object_serialisation_as_a_fresh_copy():
    sent = Message(RecordDict({"arrays": arrays(), "config": ConfigRecord({"k": "v"})}), dst_node_id=100,
                   message_type="train")
    sent.metadata.__dict__["_message_id"] = sent.object_id  # as HttpGrid.push_messages sets it
    assert validate_message(remove_content_from_message(sent), is_reply_message=False) == []
    contents = {i: o.deflate() for i, o in get_all_nested_objects(sent).items()}
    received = inflate_object_from_contents(sent.object_id, contents)
    assert isinstance(received, Message) and received.content is not sent.content
    assert received.metadata.message_id == ""  # not serialised: the receiver sets it from the object id
    assert received.object_id == sent.object_id
    assert received.metadata.src_node_id == SUPERLINK_NODE_ID and received.metadata.dst_node_id == 100
    received.metadata.__dict__["_message_id"] = sent.object_id
    reply = Message(RecordDict({"metrics": MetricRecord({"n": 1})}), reply_to=received)
    assert reply.metadata.reply_to_message_id == sent.object_id and reply.metadata.src_node_id == 100
    reply.metadata.__dict__["_message_id"] = reply.object_id
    assert validate_message(reply, is_reply_message=True) == []
    assert MESSAGE_TTL_TOLERANCE > 0
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={"x": 1.5})
    assert context_from_proto(context_to_proto(context)).run_config == {"x": 1.5}
