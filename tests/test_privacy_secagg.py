"""Secure aggregation (server/secagg.py, client/secagg.py), in process (see test_federation_support): a
SecAgg+ round gives the plain weighted mean within the quantization error, and nothing the center
receives holds a site's update."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
from flwr.app import Message, MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from test_federation_support import InProcessGrid, run_in_process

from common.checkpoint import load_checkpoint
from common.config import load_config
from common.model import initial_model
from common.protocol import WEIGHTS, pack_weights
from server.launch import simulate
from server.secagg import QUANTIZATION_LEVELS
from server.settings import Settings, app_defaults
from server.state import exchanged_keys


class RecordingGrid(InProcessGrid):
    """Keeps every reply the center receives. (SecAgg+ sends one content object to every site, and its
    client mod edits it: each site gets its own copy, deserialised, as over the network.)"""

    received: ClassVar[list[Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.received.extend(replies)
        return replies


RUN = {"num-server-rounds": 1, "local-steps": 1, "eval-every": 0, "min-nodes": 3, "batchnorm": "local"}
"""One round; BatchNorm stays at the sites (central DP needs it, and SecAgg+ does not care)."""


def global_weights(out, config) -> np.ndarray:
    keys = exchanged_keys(initial_model(load_config(config)), "local")
    stored = load_checkpoint(out / "checkpoints" / "round-0001.safetensors").tensors
    return pack_weights(stored, keys)[WEIGHTS].numpy()


@pytest.fixture(scope="module")
def plain(sites, config, tmp_path_factory):
    """A plain round: the initial weights, each site's update and training exams, by node."""
    RecordingGrid.received.clear()
    run_in_process(sites, {**RUN, "config": config, "out-dir": str(tmp_path_factory.mktemp("plain"))},
                   grid_class=RecordingGrid)
    train = [r for r in RecordingGrid.received if r.metadata.message_type == MessageType.TRAIN]
    model = initial_model(load_config(config))
    initial = pack_weights(model.state_dict(), exchanged_keys(model, "local"))[WEIGHTS].numpy()
    updates = {r.metadata.src_node_id: r.content["arrays"][WEIGHTS].numpy() - initial for r in train}
    examples = {r.metadata.src_node_id: int(r.content["metrics"]["num-examples"]) for r in train}
    assert len(updates) == 3 and min(np.abs(u).max() for u in updates.values()) > 1e-4
    return initial, updates, examples


@pytest.mark.slow  # two in-process runs, 15–25 s each on 2 cores
def test_a_secagg_round_gives_the_weighted_mean_and_the_center_sees_no_single_update(plain, sites, config,
                                                                                     tmp_path):
    initial, updates, examples = plain
    RecordingGrid.received.clear()
    max_weight, clip = 16.0, 8.0
    run_in_process(sites, {**RUN, "config": config, "secagg": True, "secagg-max-weight": max_weight,
                           "secagg-clipping-range": clip, "out-dir": str(tmp_path)}, grid_class=RecordingGrid)
    secure = global_weights(tmp_path, config)
    # the weighted mean, within SecAgg+'s quantization: one step per site, over the summed weight shares
    total = sum(examples.values())
    mean = initial + sum(examples[n] * u for n, u in updates.items()) / total
    step = 2 * clip / QUANTIZATION_LEVELS
    bound = len(updates) * step / (total / max_weight)
    np.testing.assert_allclose(secure, mean, rtol=0, atol=bound + 1e-6)
    assert np.abs(secure - initial).max() > 100 * bound  # the round really moved the weights

    # what came back: no weights at all, and masked vectors that are noise next to every site's update
    masked = []
    for reply in RecordingGrid.received:
        if reply.metadata.message_type != MessageType.TRAIN:
            continue
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        masked += [bytes_to_ndarray(b).astype(np.float64) for b in configs.get(Key.MASKED_PARAMETERS, [])]
    masked = [m for m in masked if m.size > 1]  # each site's masked weight share comes first
    assert len(masked) == 3 and all(m.size == initial.size for m in masked)
    for vector in masked:
        assert vector.min() >= 0 and vector.max() < 2**32 and abs(vector.mean() / 2**31 - 1) < 0.01
        for update in updates.values():
            assert abs(np.corrcoef(vector, update)[0, 1]) < 0.01


@pytest.mark.slow
def test_secagg_with_central_dp_masks_updates_the_sites_clipped_and_adds_the_noise(plain, sites, config,
                                                                                   tmp_path):
    initial, updates, _ = plain
    norm, z = 0.01, 1e-6  # every site's update is far longer than `norm`; the noise is negligible here
    assert min(np.linalg.norm(u) for u in updates.values()) > 10 * norm
    run_in_process(sites, {**RUN, "config": config, "secagg": True, "central-dp": "client-fixed",
                           "dp-clipping-norm": norm, "dp-noise-multiplier": z, "dp-sampled-sites": 3,
                           "out-dir": str(tmp_path)}, grid_class=RecordingGrid)
    secure = global_weights(tmp_path, config)
    clipped = initial + sum(u * norm / np.linalg.norm(u) for u in updates.values()) / len(updates)
    tolerance = 2e-7  # float32 weights; quantization 2·C/2^24 and noise z·C/3 are far below
    np.testing.assert_allclose(secure, clipped, rtol=0, atol=tolerance)
    unclipped = initial + sum(updates.values()) / len(updates)
    assert np.abs(secure - unclipped).max() > 100 * tolerance
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    central = report["privacy"]["central"]
    assert central["mode"] == "client-fixed" and central["rounds"] == 1 and central["epsilon"] > 0


@pytest.mark.parametrize(("change", "problem"), [
    ({"min-nodes": 2}, "secagg needs min-nodes >= 3"),
    ({"strategy": "median"}, "strategy 'median' needs single updates"),
    ({"central-dp": "server-fixed"}, "secagg combines only with central-dp = 'client-fixed'"),
    ({"secagg-clipping-range": 0.0}, "secagg-clipping-range = 0.0: must be > 0"),
])
def test_secagg_refuses_settings_it_cannot_serve(change, problem, config, tmp_path):
    run = {**app_defaults(), "config": config, "out-dir": str(tmp_path), "min-nodes": 3, "secagg": True,
           "dp-sampled-sites": 3, **change}
    with pytest.raises(ValueError, match=problem):
        Settings.from_run_config(run)


@pytest.mark.slow
def test_secagg_runs_in_flowers_own_simulation(sites, config, tmp_path):
    """Through `flwr run` (Ray, a ClientApp per message): the SecAgg+ state lives in the node's context."""
    out, lines = tmp_path / "out", []
    run = {**RUN, "config": config, "secagg": True, "secagg-max-weight": 16.0, "out-dir": str(out)}
    outcome = simulate(sites, run, home=tmp_path / "flower", timeout_s=600, echo=lines.append)
    assert outcome.ok, (outcome.status, outcome.details, outcome.log.read_text()[-3000:])
    assert "Secure aggregation completed." in outcome.log.read_text()
    assert len({line.split(":")[0] for line in lines if line.startswith("round 1 train site")}) == 3
