"""The app run by Flower itself: `flwr run` in simulation, and a deployment on loopback (a real SuperLink
and three real SuperNodes over TLS with certificates from `fedmammo certs`, their ClientApps started by
`fedmammo superexec`), each judged by the run's real outcome as the SuperLink records it."""

from __future__ import annotations

import contextlib
import json

import pytest
from test_federation_support import predictions, truth_and

from common.checkpoint import latest_checkpoint
from common.protocol import MODEL
from common.sites import site_folders
from common.stats import auc_ci
from server.certs import make_certificates
from server.launch import flwr_run, simulate, superlink, supernode, write_connection

pytestmark = pytest.mark.slow



def assert_report_matches_the_sites_files(out, rounds):
    report = json.loads((out / "report" / "report.json").read_text())
    truth, scores = truth_and(predictions(out, rounds), MODEL)
    auc, low, high = auc_ci(truth, scores)
    model = report["evaluation"]["raters"][MODEL]
    assert model["auc"] == pytest.approx(auc, abs=1e-12)
    assert model["auc_ci"] == pytest.approx([low, high], abs=1e-12)
    assert report["run"]["rounds"] == rounds and len(report["sites"]) == 3
    assert (out / "report" / "report.md").is_file() and (out / "report" / "roc.png").is_file()


def test_simulation_end_to_end(sites, config, tmp_path):
    out, lines = tmp_path / "out", []
    run = {"config": config, "num-server-rounds": 2, "local-steps": 2, "out-dir": str(out)}
    outcome = simulate(sites, run, home=tmp_path / "flower", timeout_s=300, echo=lines.append)
    assert outcome.ok, (outcome.status, outcome.details, outcome.log.read_text()[-3000:])
    assert latest_checkpoint(out / "checkpoints").name == "round-0002.safetensors"
    assert_report_matches_the_sites_files(out, 2)
    assert sum(line.startswith("round 1 evaluate all:") for line in lines) == 1  # the console's progress
    assert lines[-1] == f"report: {out / 'report' / 'report.md'}"


def test_deployment_on_loopback_over_tls(sites, config, tmp_path):
    certs = tmp_path / "certs"
    make_certificates(certs, ["localhost", "127.0.0.1"])
    out = tmp_path / "center-out"
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(superlink(tmp_path / "center", certs=certs))
        nodes = [stack.enter_context(supernode(
            tmp_path / site.name, address,
            {"data-path": str(site), "output-path": str(tmp_path / "hospital" / site.name),
             "site-name": site.name},
            root_certificates=certs / "ca.crt", warm=True)) for site in site_folders(sites)]
        write_connection(tmp_path / "center", "loopback", address, certs / "ca.crt")
        outcome = flwr_run(tmp_path / "center", "loopback",
                           {"config": config, "num-server-rounds": 2, "local-steps": 2, "eval-every": 0,
                            "min-nodes": 3, "out-dir": str(out)}, timeout_s=420)
        # `flwr run` exits 0 for a failed run too: the outcome is the SuperLink's record of the run
        broken = {"config": str(tmp_path / "missing.toml"), "out-dir": str(tmp_path / "other")}
        failed = flwr_run(tmp_path / "center", "loopback", broken, timeout_s=120)
        assert all(node.poll() is None for node in nodes)
    assert outcome.ok, (outcome.status, outcome.details, outcome.log.read_text()[-3000:])
    assert failed.status == "finished:failed" and "missing.toml does not exist" in failed.details
    assert outcome.bytes_in > 0 and outcome.bytes_out > 0  # it really went over the network
    for node in nodes:  # stopped by the context, with their ClientApp processes
        assert node.returncode is not None
    hospital = tmp_path / "hospital"
    assert len(list(hospital.glob("*/runs/*/predictions/round-0002.csv"))) == 3
    # the sites' own files, read where each hospital keeps them, give the report's pooled AUC and CI
    (out / "sites").symlink_to(hospital, target_is_directory=True)
    assert_report_matches_the_sites_files(out, 2)

