"""Differential privacy: Flower's central DP wrappers (server/privacy.py, client/clipping.py) and local DP-SGD
with Opacus (client/dp.py), run through the real ServerApp and ClientApps in this process
(test_federation_support), on the tiny 64×64 cohort."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import RDPAccountant
from test_federation_support import run_in_process

from client.app import app as client_app
from client.data import exam_set
from client.dp import PrivateSGD
from client.prepare import site_from_arrays
from client.train import run as run_local
from client.train import train_epochs
from common.checkpoint import load_checkpoint
from common.config import config_from_dict, load_config
from common.labels import ExamLabel
from common.model import DualViewDenseNet, MultiTaskLoss, initial_model
from common.protocol import CENTRAL_DP, WEIGHTS
from server.state import exchanged_keys

GROUP = '\n[model]\nnorm = "group"\n'
C = 0.01
"""Central DP's clipping norm in these tests: far below one local step's update (~0.8)."""


def _config(base: str, tmp_path_factory: pytest.TempPathFactory, name: str, extra: str) -> str:
    path = tmp_path_factory.getbasetemp() / f"privacy-{name}.toml"
    path.write_text(Path(base).read_text() + GROUP + extra)
    return str(path)


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return accountant.get_epsilon(delta)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _update_norm(out: Path, config_path: str) -> float:
    """‖global weights after round 1 − initial weights‖ over what the server sends."""
    model = initial_model(load_config(config_path))
    keys = exchanged_keys(model, "average")
    start, after = model.state_dict(), load_checkpoint(out / "checkpoints" / "round-0001.safetensors").tensors
    return float(torch.cat([(after[k] - start[k]).reshape(-1) for k in keys]).norm())


@pytest.fixture(scope="module")
def group_config(config, tmp_path_factory):
    return _config(config, tmp_path_factory, "group", "")


@pytest.fixture(scope="module")
def central(sites, group_config, tmp_path_factory):
    """One run per central DP mode, memoised: 2 rounds of 1 step, z = 1, C = 0.01."""
    runs = {}

    def run(mode: str) -> tuple[Path, object]:
        if mode not in runs:
            out = tmp_path_factory.mktemp(mode)
            grid = run_in_process(sites, {
                "config": group_config, "num-server-rounds": 2, "local-steps": 1, "eval-every": 0,
                "out-dir": str(out), "central-dp": mode, "dp-noise-multiplier": 1.0, "dp-clipping-norm": C,
                "dp-sampled-sites": 3, "dp-clipped-count-stddev": 1.0})
            runs[mode] = out, grid
        return runs[mode]

    return run


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"])
def test_central_dp_adds_calibrated_noise_and_reports_the_accountants_epsilon(central, group_config, mode):
    out, _ = central(mode)
    train = [r for r in _rows(out) if r["phase"] == "train" and r["site"] == "all"]
    report = json.loads((out / "report" / "report.json").read_text())
    privacy = report["privacy"]["central"]
    assert privacy["mode"] == mode and privacy["rounds"] == 2
    if mode.endswith("fixed"):
        releases, noise_std = [(1.0, 1.0, 2)], 1.0 * C / 3
    else:
        # Flower splits z between the update and the clipped count (σ_b = 1): z_Δ = (z⁻² − (2σ_b)⁻²)^-½; its
        # noise is scaled by the norm it has just updated; the count's bits have sensitivity 1.
        z_update = (1.0 - 0.25) ** -0.5
        norms = [C] + [r["dp_clipping_norm"] for r in report["rounds"] if "dp_clipping_norm" in r]
        releases = [(z_update * new / old, 1.0, 1) for old, new in itertools.pairwise(norms)]
        releases += [(1.0, 1.0, 1)] * 2
        noise_std = z_update * norms[1] / 3
    expected = _epsilon(releases, 1e-5)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert float(train[-1]["epsilon"]) == pytest.approx(expected, rel=1e-9)
    assert 0 < float(train[0]["epsilon"]) < float(train[1]["epsilon"])
    assert "Central (site-level) differential privacy" in (out / "report" / "report.md").read_text()
    # The mean of clipped updates has norm <= C; the noise on ~7M weights dominates it.
    d = sum(v.numel() for v in initial_model(load_config(group_config)).state_dict().values()
            if v.dtype.is_floating_point)
    assert _update_norm(out, group_config) == pytest.approx(noise_std * math.sqrt(d), abs=C, rel=0.01)


def test_client_side_clipping_bounds_the_update_a_site_sends(central):
    """The site itself clips: replaying a round-1 train message, the weights it sends are within C of the
    global ones; the same message without the mode is not clipped."""
    _, grid = central("client-fixed")
    msg = next(m for m in grid.sent if m.metadata.message_type == "train")
    config = msg.content["config"]
    assert config[CENTRAL_DP] == "client-fixed" and config[KEY_CLIPPING_NORM] == C
    context = grid.contexts[msg.metadata.dst_node_id]
    sent = msg.content["arrays"][WEIGHTS].numpy()

    def update_norm() -> float:
        reply = client_app(msg, Context(run_id=1, node_id=context.node_id, node_config=context.node_config,
                                        state=RecordDict(), run_config=context.run_config))
        return float(np.linalg.norm(reply.content["arrays"][WEIGHTS].numpy() - sent))

    assert update_norm() <= C * (1 + 1e-3)  # float32 rounding over ~7M weights
    config[CENTRAL_DP] = "none"
    assert update_norm() > 10 * C


def test_server_side_clipping_bounds_the_aggregated_update(sites, group_config, tmp_path):
    """With negligible noise the global step is the mean of updates clipped to C."""
    run_in_process(sites, {"config": group_config, "num-server-rounds": 1, "local-steps": 1, "eval-every": 0,
                           "out-dir": str(tmp_path), "central-dp": "server-fixed",
                           "dp-noise-multiplier": 1e-6, "dp-clipping-norm": C, "dp-sampled-sites": 3})
    assert C / 10 < _update_norm(tmp_path, group_config) <= C * 1.01


def test_central_dp_settings_are_checked(sites, config, group_config, tmp_path):
    base = {"num-server-rounds": 1, "local-steps": 1, "out-dir": str(tmp_path)}
    with pytest.raises(ValueError, match="dp-sampled-sites must be"):
        run_in_process(sites, {**base, "config": group_config, "central-dp": "server-fixed"})
    with pytest.raises(ValueError, match="central-dp = 'local': expected one of none"):
        run_in_process(sites, {**base, "config": group_config, "central-dp": "local"})
    with pytest.raises(ValueError, match="BatchNorm's running variances"):
        run_in_process(sites, {**base, "config": config, "central-dp": "server-fixed", "dp-sampled-sites": 3})
    with pytest.raises(ValueError, match="the strategy sampled 3 sites but dp-sampled-sites is 2"):
        run_in_process(sites, {**base, "config": group_config, "central-dp": "server-fixed",
                               "dp-sampled-sites": 2})


# --- local DP-SGD ------------------------------------------------------------------------------------------


def test_dp_sgd_refuses_batchnorm_and_what_breaks_per_exam_clipping(config):
    values = {"privacy": {"dp_sgd": True, "target_epsilon": 3.0}}
    with pytest.raises(ValueError, match=r"model\.norm must be 'group'"):
        config_from_dict(values, "site.toml")
    with pytest.raises(ValueError, match=r"train\.balance 'sampler'"):
        config_from_dict({**values, "model": {"norm": "group"}, "train": {"balance": "sampler"}}, "site.toml")
    with pytest.raises(ValueError, match="set target_epsilon or noise_multiplier"):
        config_from_dict({"privacy": {"dp_sgd": True}, "model": {"norm": "group"}}, "site.toml")


def test_local_training_refuses_a_dp_config(tmp_path, capsys):
    path = tmp_path / "dp.toml"
    path.write_text('[model]\nnorm = "group"\n[privacy]\ndp_sgd = true\ntarget_epsilon = 3.0\n')
    args = argparse.Namespace(config=str(path), out=str(tmp_path / "out"), resume=False, dirs=[str(tmp_path)])
    assert run_local(args) == 2
    assert "dp_sgd is for federated runs" in capsys.readouterr().err


def _private(noise: float, batch_size: int, sample_rate: float = 1.0, chunk: int = 0) -> PrivateSGD:
    config = config_from_dict({"model": {"norm": "group"}, "train": {"batch_size": batch_size},
                               "privacy": {"dp_sgd": True, "noise_multiplier": max(noise, 1.0),
                                           "max_grad_norm": 0.5}})
    return PrivateSGD(config.privacy, batch_size, sample_rate, noise, [], chunk, seed=2)


def test_dp_sgd_clips_each_exams_gradient(tmp_path):
    """Opacus's per-exam gradients (shared trunk, two views) equal one-exam-at-a-time gradients, and the
    step's gradient is the mean of those clipped to max_grad_norm (no noise here). In float64: in float32
    a batch's and single exams' gradients of this 121-layer network differ by ~1% from rounding alone."""
    torch.manual_seed(0)
    model = DualViewDenseNet(norm="group", dropout=0.0).double()
    views = torch.rand(3, 2, 32, 32, dtype=torch.float64)
    malignant, birads = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0, 2, 3])
    criterion = MultiTaskLoss()
    reference = []
    for i in range(3):
        model.zero_grad()
        criterion(model(views[i : i + 1]), malignant[i : i + 1], birads[i : i + 1]).backward()
        reference.append({n: p.grad.clone() for n, p in model.named_parameters()})
    private = _private(0.0, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    module, dp_optimizer, _ = private.attach(model, optimizer, 3)
    criterion(module(views), malignant, birads).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, torch.stack([r[name] for r in reference]), rtol=1e-4,
                                   atol=1e-8)
    dp_optimizer.pre_step()
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in r.values())) for r in reference]
    assert max(norms) > 0.5  # the bound binds
    factors = [min(1.0, 0.5 / (n + 1e-6)) for n in norms]
    for name, p in model.named_parameters():
        expected = sum(f * r[name] for f, r in zip(factors, reference, strict=True)) / 3
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-8)
    private.detach()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_dp_sgd_refuses_a_channels_last_model():
    """Opacus computes silently wrong per-sample convolution gradients in channels_last."""
    model = DualViewDenseNet(norm="group").to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels_last"):
        _private(1.0, 4).attach(model, torch.optim.SGD(model.parameters(), lr=0.1), 8)


def test_dp_sgd_in_chunks_trains_as_whole_batches():
    """`physical_batch_size` splits each Poisson batch into chunks (Opacus's BatchMemoryManager): the same
    step, the same update (no noise here; up to float32 rounding), the same account. A chunk counted as a
    step would end the round on a skipped step: no update at all."""
    torch.manual_seed(0)
    labels = [ExamLabel(f"p{i}", f"1.2.{i}", "L", bool(i % 2), 2 + i % 4, "c", False, "train")
              for i in range(8)]
    data = exam_set([site_from_arrays("site", torch.rand(8, 2, 32, 32).half().numpy(), labels)])
    config = config_from_dict({"model": {"norm": "group", "dropout": 0.0}, "train": {"batch_size": 4,
                                                                                     "augment": False}})
    results = []
    for chunk in (0, 1):
        torch.manual_seed(1)
        model = DualViewDenseNet(norm="group", dropout=0.0)
        start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        private = _private(0.0, 4, sample_rate=0.5, chunk=chunk)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = train_epochs(model, data, config, steps=1, optimizer=sgd,
                             generator=torch.Generator().manual_seed(2), progress=False, private=private)
        update = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
        results.append((stats.steps, private.history, update))
        # nothing of the last batch stays on the model, which `client.app` lends to the next message
        assert not [a for p in model.parameters() for a in ("grad_sample", "summed_grad")
                    if getattr(p, a, None) is not None]
    (steps, history, whole), (chunked_steps, chunked_history, chunked) = results
    assert steps == chunked_steps == 1 and history == chunked_history == [(0.0, 0.5, 1)]
    assert float((chunked - whole).norm()) < 0.01 * float(whole.norm())


@pytest.fixture(scope="module")
def dp_sgd_run(sites, config, tmp_path_factory):
    """2 rounds of 1 step of DP-SGD at z = 1 (target ε 10 as a cap), after one round a resume."""
    path = _config(config, tmp_path_factory, "dpsgd",
                   "[privacy]\ndp_sgd = true\nnoise_multiplier = 1.0\ntarget_epsilon = 10.0\n")
    out = tmp_path_factory.mktemp("dpsgd")
    settings = {"config": path, "num-server-rounds": 2, "local-steps": 1, "eval-every": 0,
                "out-dir": str(out)}
    run_in_process(sites, settings)
    return out, settings


def test_dp_sgd_reports_each_sites_epsilon_every_round(dp_sgd_run):
    out, _ = dp_sgd_run
    rows = [r for r in _rows(out) if r["phase"] == "train" and r["site"] != "all"]
    assert len(rows) == 6
    # 8 training exams, batch 4: q = 1/2; one step a round
    for r in rows:
        assert float(r["epsilon"]) == pytest.approx(_epsilon([(1.0, 0.5, int(r["round"]))], 1e-5), rel=1e-9)
    sites = json.loads((out / "report" / "report.json").read_text())["privacy"]["local"]["sites"]
    assert {s["last_round_trained"] for s in sites.values()} == {2}
    state = sorted(out.glob("sites/*/runs/*/privacy/round-0002.json"))
    assert len(state) == 3 and json.loads(state[0].read_text())["history"] == [[1.0, 0.5, 2]]


def test_a_site_whose_budget_is_spent_stops_and_the_run_goes_on(sites, dp_sgd_run, caplog):
    """One site has spent more than the others (its account says so): in round 3 it stops training, says
    why, and the two others train on."""
    out, settings = dp_sgd_run
    state = sorted(out.glob("sites/*/runs/*/privacy/round-0002.json"))[0]
    account = json.loads(state.read_text())
    account["history"].append([1.0, 0.5, 10])  # as if it had trained 10 more steps
    state.write_text(json.dumps(account))
    with caplog.at_level(logging.WARNING):
        run_in_process(sites, {**settings, "num-server-rounds": 3, "resume": True})
    assert "privacy budget spent" in caplog.text and "this site stops training" in caplog.text
    trained = {r["site"] for r in _rows(out) if r["phase"] == "train" and r["round"] == "3" and r["epsilon"]}
    assert len(trained) == 2 and state.parts[-5] not in trained
    local = json.loads((out / "report" / "report.json").read_text())["privacy"]["local"]["sites"]
    assert local[state.parts[-5]]["last_round_trained"] == 2
    assert all(local[s]["last_round_trained"] == 3 for s in trained)
