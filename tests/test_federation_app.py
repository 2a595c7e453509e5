"""The ServerApp and ClientApp together, in this process (see test_federation_support): rounds,
checkpoints and resume, failing sites, strategies, FedBN, and the federated evaluation's exactness."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from browser_support import CHROMIUM, NO_CHROMIUM, check_report_page
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)
from test_federation_support import predictions, run_in_process, truth_and

import client.app
import server.state
from client.train import load_weights
from common.checkpoint import config_of, latest_checkpoint, load_checkpoint, save_checkpoint
from common.cli import main
from common.config import Config
from common.model import build_model, initial_model
from common.protocol import LOCAL_ONLY, MODEL, SITE_MODEL, SITE_WEIGHT, WEIGHTS, pack_weights, unpack_weights
from common.stats import auc_ci, cohen_kappa, delong_test, mcnemar_tests
from common.stats.scores import parse_scores
from server.exchange import RoundError
from server.settings import Settings
from server.state import align_strategy, exchanged_keys
from server.strategy import make_strategy


@pytest.fixture(scope="module")
def finished(sites, config, tmp_path_factory):
    """A complete 2-round run with an evaluation after round 1, local-only baselines and the report."""
    out = tmp_path_factory.mktemp("run")
    run_in_process(sites, {"config": config, "num-server-rounds": 2, "local-steps": 2, "baselines": True,
                           "out-dir": str(out)})
    return out


def test_a_run_checkpoints_every_round_and_writes_metrics_and_report(finished, sites):
    assert latest_checkpoint(finished / "checkpoints").name == "round-0002.safetensors"
    assert (finished / "checkpoints" / "round-0001.safetensors").is_file()
    with (finished / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["round"], r["phase"]) for r in rows} == {("1", "train"), ("1", "evaluate"), ("2", "train"),
                                                         ("2", "evaluate")}
    assert {r["site"] for r in rows} == {"all", "site1_helion", "site2_nordvik", "site3_kestrel"}
    report = finished / "report"
    for name in ("report.json", "report.md", "raters.csv", "comparisons.csv", "roc.png",
                 "learning_curves.png", "roc_site_site1_helion.png"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    assert "Table 1" in text and "model vs local-only" in text and "### density=dense" in text
    # The sites' synthetic cohort (its data root's cohort.json): the ideal observer beside the model.
    ceiling = json.loads((sites / "cohort.json").read_text())["total"]["ideal_observer"]["test"]
    pooled = json.loads((report / "report.json").read_text())["evaluation"]["raters"][MODEL]
    low, high = ceiling["auc_ci"]
    assert (f"| **All sites** | {ceiling['auc']:.3f} ({low:.3f}–{high:.3f}) | {pooled['auc']:.3f} "
            in text.split("## The synthetic cohort's ceiling")[1])
    path = finished / "global.safetensors"  # what `fedmammo predict --weights` reads
    checkpoint = load_checkpoint(path)
    stored = config_of(checkpoint, path)
    load_weights(build_model(stored.model, stored.data.bilateral), checkpoint, path)
    assert checkpoint.metadata["round"] == 2 and stored.data.image_size == (64, 64)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_html_shows_every_table_and_figure_of_the_run_in_a_browser(finished):
    page = check_report_page(finished / "report")
    assert "Run settings" in page.value["text"] and "local-steps" in page.value["text"]


def test_pooled_auc_ci_and_delong_equal_the_central_computation_on_the_sites_files(finished):
    evaluation = json.loads((finished / "report" / "report.json").read_text())["evaluation"]
    rows = predictions(finished, 2)
    assert len(rows) == 24  # 8 test exams at each of 3 sites
    truth, model = truth_and(rows, MODEL)
    auc, low, high = auc_ci(truth, model)
    assert evaluation["raters"][MODEL]["auc"] == pytest.approx(auc, abs=1e-12)
    assert evaluation["raters"][MODEL]["auc_ci"] == pytest.approx([low, high], abs=1e-12)
    senior = [r["reader_senior1"] for r in rows]  # BI-RADS reads, on the statistics' ordinal scale
    reads = {LOCAL_ONLY: truth_and(rows, LOCAL_ONLY)[1],
             "reader_senior1": parse_scores(senior, "reader", range(len(rows)))[0]}
    for other, scores in reads.items():
        z, p = delong_test(truth, model, scores)
        entry = next(c for c in evaluation["comparisons"] if c["b"] == other)
        assert (entry["z"], entry["p"]) == pytest.approx((z, p), abs=1e-9)
        # kappa and McNemar from the sites' 2×2 tables, as from the pairs of calls in their files
        calls = [s >= evaluation["raters"][r]["threshold"] for r, s in ((MODEL, model), (other, scores))]
        kappa = cohen_kappa(*calls)
        assert entry["kappa"] == (None if np.isnan(kappa.value) else pytest.approx(kappa.value, abs=1e-12))
        tests = mcnemar_tests(truth, *calls)
        assert [entry["mcnemar"][m]["p"] for m in tests] == pytest.approx([t.p for t in tests.values()],
                                                                          abs=1e-12)


def test_each_sites_table_equals_its_own_file(finished):
    evaluation = json.loads((finished / "report" / "report.json").read_text())["evaluation"]
    for path in sorted(finished.glob("sites/*/runs/*/predictions/round-0002.csv")):
        site = path.parents[3].name
        with path.open(newline="") as f:
            truth, model = truth_and(list(csv.DictReader(f)), MODEL)
        table = evaluation["subgroups"][f"site={site}"]
        assert table["n_cases"] == len(truth)
        if min(truth.sum(), (~truth).sum()) >= 2:
            assert table["raters"][MODEL]["auc"] == pytest.approx(auc_ci(truth, model)[0], abs=1e-12)
        else:
            assert table["raters"][MODEL]["auc_ci"] is None


def test_nothing_per_case_reaches_the_server(finished):
    """The report and checkpoints hold no exam ids: the prediction files stay in the sites' folders."""
    exam = predictions(finished, 2)[0]["exam_id"]
    for path in [*finished.glob("report/*"), *finished.glob("checkpoints/*"), finished / "metrics.csv"]:
        assert exam.encode() not in path.read_bytes(), path


def test_resume_continues_exactly_as_an_uninterrupted_run(sites, config, tmp_path, monkeypatch):
    """FedAdam (server state: Adam moments) with FedBN (site state: BatchNorm layers)."""
    run = {"config": config, "strategy": "fedadam", "server-lr": 0.01, "batchnorm": "local", "eval-every": 0,
           "local-steps": 1}
    run_in_process(sites, {**run, "num-server-rounds": 2, "out-dir": str(tmp_path / "straight")})
    run_in_process(sites, {**run, "num-server-rounds": 1, "out-dir": str(tmp_path / "stopped")})
    with pytest.raises(ValueError, match="already holds a run"):
        run_in_process(sites, {**run, "num-server-rounds": 2, "out-dir": str(tmp_path / "stopped")})
    with pytest.raises(ValueError, match=r"cannot resume exactly.*strategy = 'fedadam' \(now 'fedavg'\)"):
        run_in_process(sites, {**run, "strategy": "fedavg", "num-server-rounds": 2, "resume": True,
                               "out-dir": str(tmp_path / "stopped")})
    with monkeypatch.context() as m:  # a fedmammo whose preprocessing makes other inputs
        m.setattr(server.state, "INPUTS_VERSION", server.state.INPUTS_VERSION + 1)
        with pytest.raises(ValueError, match=r"inputs of preprocessing version"):
            run_in_process(sites, {**run, "num-server-rounds": 2, "resume": True,
                                   "out-dir": str(tmp_path / "stopped")})
    run_in_process(sites, {**run, "num-server-rounds": 2, "resume": True,
                           "out-dir": str(tmp_path / "stopped")})

    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "round-0002.safetensors")
    resumed = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "round-0002.safetensors")
    assert straight.tensors.keys() == resumed.tensors.keys()
    assert any(k.startswith("strategy::v_t::") for k in resumed.tensors)
    assert not any("norm" in k for k in resumed.tensors if not k.startswith("strategy::"))  # FedBN
    for key, value in straight.tensors.items():
        assert torch.equal(value, resumed.tensors[key]), key
    assert straight.metadata["history"][-1]["loss"] == resumed.metadata["history"][-1]["loss"]
    for site in ("site1_helion", "site3_kestrel"):  # the sites' own BatchNorm state, too
        [a] = (tmp_path / "straight" / "sites" / site).glob("runs/*/local-state/round-0002.safetensors")
        [b] = (tmp_path / "stopped" / "sites" / site).glob("runs/*/local-state/round-0002.safetensors")
        kept_a, kept_b = load_checkpoint(a).tensors, load_checkpoint(b).tensors
        assert any("norm" in k for k in kept_a)
        assert all(torch.equal(kept_a[k], kept_b[k]) for k in kept_a)

    # FedBN leaves no global model at the center; each site keeps its complete one, which predict reads
    # and which scores the site's test exams as the final evaluation did.
    assert not (tmp_path / "straight" / "global.safetensors").exists()
    site = "site2_nordvik"
    [model] = (tmp_path / "straight" / "sites" / site).glob(f"runs/*/{SITE_MODEL}")
    assert load_checkpoint(model).metadata["site"] == site
    out = tmp_path / "predicted.json"
    assert main(["predict", str(sites / site), "--weights", str(model), "--json", str(out)]) == 0
    scored = {e["exam_id"]: round(e["malignancy_score"], 1) for e in json.loads(out.read_text())["exams"]}
    final = {r["exam_id"]: float(r[MODEL]) for r in predictions(tmp_path / "straight", 2)
             if r["exam_id"] in scored}
    assert len(scored) == 8 and scored == pytest.approx(final, abs=0.1 + 1e-9)  # the file keeps 1 decimal


def test_fedavgm_steps_from_the_weights_sent():
    """FedAvgM takes its pseudo-gradient against its own copy of the weights it last returned; a central
    DP wrapper noises them after that copy was kept, and a resumed run holds only the checkpoint. The
    reference must be what the sites are sent (`server.state.align_strategy`)."""
    sent = ArrayRecord({WEIGHTS: Array(np.zeros(3, np.float32))})
    for strategy in (FedAvgM(), DifferentialPrivacyServerSideFixedClipping(FedAvgM(), 1.0, 1.0, 2)):
        inner = getattr(strategy, "strategy", strategy)
        inner.current_arrays = ArrayRecord({WEIGHTS: Array(np.ones(3, np.float32))})  # noise-free copy
        align_strategy(strategy, sent)
        assert inner.current_arrays is sent


def test_resume_refuses_another_round_count_under_a_cosine_schedule(sites, config, tmp_path):
    """A cosine schedule spans the whole run: with another num-server-rounds every round's learning rate
    moves, so the resumed run could not end as an uninterrupted one would. A constant rate may be extended
    (the test above); a setting that changes only speed may change."""
    cosine = tmp_path / "cosine.toml"
    cosine.write_text(Path(config).read_text().replace("[train]\n", "[train]\nlr_schedule = \"cosine\"\n"))
    run = {"config": str(cosine), "eval-every": 0, "local-steps": 1, "out-dir": str(tmp_path / "run")}
    run_in_process(sites, {**run, "num-server-rounds": 1})
    with pytest.raises(ValueError, match=r"num-server-rounds = 1 \(now 2\): the cosine learning-rate "):
        run_in_process(sites, {**run, "num-server-rounds": 2, "resume": True})
    faster = tmp_path / "faster.toml"
    faster.write_text(cosine.read_text().replace("num_threads = 1", "num_threads = 2"))
    run_in_process(sites, {**run, "config": str(faster), "num-server-rounds": 1, "resume": True,
                           "round-timeout": 60.0})


def test_a_run_checkpointed_before_a_run_config_key_existed_resumes_with_its_default(sites, config, tmp_path):
    """Upgrading fedmammo mid-study: a run-config key the checkpoint's stored settings do not hold (added by
    a later version, here `transfer-dtype`) counts as its default; another value is still refused."""
    run = {"config": config, "eval-every": 0, "local-steps": 1, "out-dir": str(tmp_path / "run")}
    run_in_process(sites, {**run, "num-server-rounds": 1})
    path = latest_checkpoint(tmp_path / "run" / "checkpoints")
    stored = load_checkpoint(path)
    older = {k: v for k, v in stored.metadata["run-config"].items() if k != "transfer-dtype"}
    save_checkpoint(path, stored.tensors, {**stored.metadata, "run-config": older})
    with pytest.raises(ValueError, match=r"transfer-dtype = 'float32' \(now 'bfloat16'\)"):
        run_in_process(sites, {**run, "num-server-rounds": 2, "resume": True, "transfer-dtype": "bfloat16"})
    run_in_process(sites, {**run, "num-server-rounds": 2, "resume": True})
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "round-0002.safetensors"


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_its_error(sites, config, tmp_path,
                                                                          monkeypatch):
    """Checkpoints are written beside the next round (`server.state.checkpoint_writer`): a failed write must
    still stop the run, naming the cause, and never leave a later round's checkpoint behind it."""

    def full_disk(path, tensors, metadata=None):
        if path.name == "round-0001.safetensors":
            raise OSError(28, "No space left on device", str(path))
        return save_checkpoint(path, tensors, metadata)

    monkeypatch.setattr("server.state.save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_in_process(sites, {"config": config, "num-server-rounds": 3, "local-steps": 1, "eval-every": 0,
                               "out-dir": str(tmp_path)})
    assert latest_checkpoint(tmp_path / "checkpoints") is None
    assert not list((tmp_path / "checkpoints").glob("round-*"))  # round 2's write was never started


def test_a_round_in_which_every_site_fails_stops_the_run_without_a_checkpoint(sites, config, tmp_path):
    with pytest.raises(RoundError, match=r"round 1 training: no site replied: 3 of 3 failed \(RuntimeError"):
        run_in_process(sites, {"config": config, "out-dir": str(tmp_path)}, fail=[0, 1, 2])
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_a_site_without_training_exams_fails_by_name(sites, config, tmp_path):
    empty = tmp_path / "sites" / "site9_empty"
    empty.mkdir(parents=True)
    (empty / "labels.csv").write_text((sites / "site1_helion" / "labels.csv").read_text())
    run = {"config": config, "min-nodes": 1, "out-dir": str(tmp_path / "out")}
    with pytest.raises(RoundError, match=r"1 of 1 failed \(RuntimeError: site site9_empty: no training"):
        run_in_process(tmp_path / "sites", run)


def test_a_failed_site_is_left_out_and_the_round_goes_on(sites, config, tmp_path):
    run_in_process(sites, {"config": config, "num-server-rounds": 1, "local-steps": 1,
                           "out-dir": str(tmp_path)}, fail=[1])
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    trained = {r["site"] for r in rows if r["phase"] == "train" and not r["missing"]}
    assert trained == {"site1_helion", "site3_kestrel", "all"}
    # it never replied, so its name is unknown: its node is named missing (see test_reliability_sites.py)
    assert {r["site"] for r in rows if r["missing"]} == {"node 101"}
    assert [r["n"] for r in rows if r["phase"] == "evaluate" and r["site"] == "all"] == ["16"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "krum"])
def test_strategies_run_a_round(sites, config, tmp_path, strategy):
    grid = run_in_process(sites, {"config": config, "strategy": strategy, "num-server-rounds": 1,
                                  "local-steps": 1, "out-dir": str(tmp_path)})
    trained = load_checkpoint(tmp_path / "checkpoints" / "round-0001.safetensors").tensors
    start = initial_model(Config()).state_dict()
    assert not torch.equal(trained["malignancy.weight"], start["malignancy.weight"])
    mu = [m.content["config"].get("proximal-mu") for m in grid.sent if m.metadata.message_type == "train"]
    assert mu == ([0.01] * 3 if strategy == "fedprox" else [None] * 3)


def test_exchanged_weights_leave_batchnorm_counters_and_with_fedbn_every_batchnorm_entry_at_the_site():
    model = initial_model(Config())
    averaged, fedbn = exchanged_keys(model, "average"), exchanged_keys(model, "local")
    assert "features.norm0.running_mean" in averaged and "features.norm0.num_batches_tracked" not in averaged
    assert not [k for k in fedbn if "norm" in k]
    assert "features.conv0.weight" in fedbn and "malignancy.bias" in fedbn


def test_a_model_lent_from_message_to_message_trains_exactly_as_a_fresh_copy(sites, config, tmp_path,
                                                                           monkeypatch):
    """In one process, as in a simulation worker, every site's messages get the same lent model in turn
    (`client.app._lent_model`): nothing of one message (weights, FedBN's BatchNorm layers and counters,
    gradients) may reach the next, so the run equals one with a fresh copy of the model for each message."""
    run = {"config": config, "num-server-rounds": 2, "local-steps": 1, "batchnorm": "local", "eval-every": 1}
    run_in_process(sites, {**run, "out-dir": str(tmp_path / "lent")})  # evaluations between trainings too

    @contextlib.contextmanager
    def fresh(config_toml: str):
        yield copy.deepcopy(client.app._model_template(config_toml))

    monkeypatch.setattr(client.app, "_lent_model", fresh)
    run_in_process(sites, {**run, "out-dir": str(tmp_path / "fresh")})
    lent, fresh_run = (load_checkpoint(tmp_path / out / "checkpoints" / "round-0002.safetensors").tensors
                       for out in ("lent", "fresh"))
    assert all(torch.equal(lent[k], fresh_run[k]) for k in lent)
    for site in ("site1_helion", "site2_nordvik", "site3_kestrel"):
        [a], [b] = (list((tmp_path / out / "sites" / site).glob(f"runs/*/{SITE_MODEL}"))
                    for out in ("lent", "fresh"))
        kept_a, kept_b = load_checkpoint(a).tensors, load_checkpoint(b).tensors
        assert kept_a.keys() == kept_b.keys() and all(torch.equal(kept_a[k], kept_b[k]) for k in kept_a), site


def test_a_message_that_fails_does_not_give_its_lent_model_back():
    with client.app._lent_model("") as model:
        pass
    with pytest.raises(RuntimeError), client.app._lent_model("") as failed:
        assert failed is model  # given back after a message that succeeded
        raise RuntimeError("training failed half-way")
    with client.app._lent_model("") as after:
        assert after is not failed


def test_weights_travel_as_one_array_and_come_back_exactly():
    state = initial_model(Config()).state_dict()
    keys = exchanged_keys(initial_model(Config()), "average")
    packed = pack_weights(state, keys)
    assert list(packed) == [WEIGHTS] and packed[WEIGHTS].numpy().dtype == np.float32
    back = unpack_weights(packed, keys, state)
    assert all(torch.equal(back[k], state[k]) for k in keys)
    with pytest.raises(ValueError, match="config mismatch"):
        unpack_weights(packed, keys[:-1], state)


def test_settings_name_the_wrong_key(tmp_path):
    from server.settings import app_defaults
    good = {**app_defaults(), "out-dir": str(tmp_path)}
    assert Settings.from_run_config(good).strategy == "fedavg"
    with pytest.raises(ValueError, match="strategy = 'fedsgd': expected one of fedavg"):
        Settings.from_run_config({**good, "strategy": "fedsgd"})
    with pytest.raises(ValueError, match="run config: num-server-rounds = 'three': expected an integer"):
        Settings.from_run_config({**good, "num-server-rounds": "three"})
    with pytest.raises(ValueError, match="run config: baselines = 1: expected true or false"):
        Settings.from_run_config({**good, "baselines": 1})
    with pytest.raises(ValueError, match="does not exist"):
        Settings.from_run_config({**good, "config": str(tmp_path / "missing.toml")})
    with pytest.raises(ValueError, match="site-weighting = 'size': expected one of examples, equal"):
        Settings.from_run_config({**good, "site-weighting": "size"})
    dp_ready = {**good, "dp-sampled-sites": 3, "batchnorm": "local"}  # what central DP asks for besides
    by = {}
    for weights in ("examples", "equal"):
        for dp in ("none", "server-fixed"):
            run = Settings.from_run_config({**dp_ready, "site-weighting": weights, "central-dp": dp})
            strategy = make_strategy(run, Config())
            by[weights, dp] = getattr(strategy, "strategy", strategy).weighted_by_key  # inside a DP wrapper
    assert by == {("examples", "none"): "num-examples", ("equal", "none"): SITE_WEIGHT,
                  ("examples", "server-fixed"): SITE_WEIGHT, ("equal", "server-fixed"): SITE_WEIGHT}
    with pytest.raises(ValueError, match="run config out-dir = 'runs/x': give an absolute path"):
        Settings.from_run_config({**good, "out-dir": "runs/x"})
    expected = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedavgm": FedAvgM,
                "trimmed-mean": FedTrimmedAvg, "median": FedMedian, "krum": Krum}
    for name, kind in expected.items():
        strategy = make_strategy(dataclasses.replace(Settings.from_run_config(good), strategy=name), Config())
        assert type(strategy) is kind and strategy.min_available_nodes == good["min-nodes"]
