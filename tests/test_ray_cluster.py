"""Simulation on a Ray cluster (docs/cluster.md): what a virtual site may ask Ray for, the errors given
before any process starts, and a real two-node Ray cluster on loopback (a head and a second node, each
with its own declared resources, both started and stopped here) that runs a 6-site federation, with Ray's
own records showing that the sites' ClientApps ran on both nodes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from argparse import Namespace
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.core.generated import gcs_pb2
from test_federation_support import wait_for

from common.synth.generate import CohortSpec, generate
from server.launch import (
    OFFLINE_ENV,
    LaunchError,
    _process,
    check_site_resources,
    free_port,
    ray_cluster_nodes,
    simulate,
    sites_at_once,
)
from server.launch import run as federate

WORKER_PORTS = 40
"""Ports each node's Ray workers may bind: a range of their own, as two nodes share this machine."""
NODE_PORTS = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
              "metrics-export", "runtime-env-agent")
"""`ray start --<name>-port` options that every node needs distinct on one machine (Ray's defaults clash)."""


def test_site_resources_follow_flowers_actor_pool():
    check_site_resources(2, 0.25)
    check_site_resources(1, 2)
    for cpus, gpus, message in ((0, 0.0, "CPUs per site = 0"), (1.5, 0.0, "CPUs per site = 1.5"),
                                (1, -0.5, "GPUs per site = -0.5"), (1, 1.5, "GPUs per site = 1.5")):
        with pytest.raises(LaunchError, match=message):
            check_site_resources(cpus, gpus)
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 8.0}, {"CPU": 2.0, "GPU": 4.0}]
    assert sites_at_once(nodes, 2, 0.0) == 8 + 4 + 1
    assert sites_at_once(nodes, 2, 0.25) == 4 + 0 + 1  # a site asking for a GPU share never lands on node 2
    assert sites_at_once(nodes, 1, 2.0) == 0 + 0 + 2
    assert sites_at_once(nodes, 32, 0.0) == 0


def test_bad_cluster_settings_fail_before_any_process_starts(tmp_path, capsys):
    sites = tmp_path / "data"
    for name in ("a", "b"):
        (sites / name).mkdir(parents=True)
        (sites / name / "labels.csv").touch()
    run = {"out-dir": str(tmp_path / "out")}
    refused = "this machine's Ray instance (1 node(s), 3 CPU(s), 0 GPU(s)) has no node that can run a site"
    with pytest.raises(LaunchError, match=re.escape(f"{refused} asking for 1 CPU(s) and 0.5 GPU(s)")):
        simulate(sites, run, home=tmp_path / "flower", gpus_per_site=0.5,
                 federation_config={"init-args-num-cpus": 3, "init-args-num-gpus": 0})
    with pytest.raises(LaunchError, match="init-args-num-cpus size a simulation's own Ray instance"):
        simulate(sites, run, home=tmp_path / "flower", ray_address="127.0.0.1:1",
                 federation_config={"init-args-num-cpus": 3})
    with pytest.raises(LaunchError, match="Ray address 'ray-head': give the head's HOST:PORT"):
        simulate(sites, run, home=tmp_path / "flower", ray_address="ray-head")
    with pytest.raises(LaunchError, match=f"no Ray head answers at 127.0.0.1:{(port := free_port())}"):
        simulate(sites, run, home=tmp_path / "flower", ray_address=f"127.0.0.1:{port}")
    args = Namespace(data_root=None, connection="center", config=None, out=str(tmp_path / "out"), rounds=None,
                     resume=False, run_config=[], timeout=60.0, ray_address="127.0.0.1:6379",
                     cpus_per_site=None, gpus_per_site=0.5)
    assert federate(args) == 2
    assert "--ray-address, --gpus-per-site: simulation only" in capsys.readouterr().err
    assert not (tmp_path / "flower").exists() and not (tmp_path / "out").exists()


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:  # all held at once: no port handed out twice
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]


def _free_range(size: int) -> int:
    """The first port of `size` consecutive ports that are free now."""
    for low in random.sample(range(20000, 32000, size), 40):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(low, low + size):
                    stack.enter_context(socket.socket()).bind(("", port))
            return low
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports")


@contextlib.contextmanager
def ray_node(temp_dir: Path, *options: str) -> Iterator[subprocess.Popen]:
    """One Ray node on loopback: `ray start --block` in its own process group, all its ports its own, its
    logs in `temp_dir`. Leaving the context stops the group (the node's raylet, workers and agents, the
    head's GCS); `ray stop` is no way to stop it: it stops every Ray process on the machine."""
    low = _free_range(WORKER_PORTS)
    ports = [f"--{name}-port={port}"
             for name, port in zip(NODE_PORTS, _free_ports(len(NODE_PORTS)), strict=True)]
    command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--object-store-memory=100000000",
               f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}", *ports, *options]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | OFFLINE_ENV
    log = temp_dir.with_suffix(".log")
    with _process(command, env, log, grace_s=30.0) as process:
        wait_for(lambda: process.poll() is not None or "Ray runtime started" in log.read_text(), 120,
                 f"`ray start` of {temp_dir.name}")
        assert process.poll() is None, log.read_text()[-3000:]
        yield process


def client_app_runs(address: str) -> Counter[str]:
    """Ray's own record of where the ClientApps ran: the GCS's task events of every `ClientAppActor.run`
    (Flower's call of one site's ClientApp for one message), counted per node, each node named by the
    resource it declared. These are the records `ray list tasks` shows; that command needs Ray's
    dashboard, which fedmammo does not install, so they are read from the GCS directly."""
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        names = {node["NodeID"]: name for node in ray.nodes() for name in ("node_a", "node_b")
                 if name in node["Resources"]}
        runs: Counter[str] = Counter()
        for raw in ray._private.state.state._connect_and_get_accessor().get_task_events():
            event = gcs_pb2.TaskEvents.FromString(raw)
            if event.task_info.func_or_class_name == "ClientAppActor.run":
                runs[names[event.state_updates.node_id.hex()]] += 1
        return runs
    finally:
        ray.shutdown()


def _left_over(sessions: set[int], folder: Path) -> list[int]:
    """Processes of these sessions (each node's `ray start` leads its own), or naming `folder` in their
    command line (a Ray process that left the session still names its node's temp folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if not proc.name.isdigit():
                continue
            session = int((proc / "stat").read_text().rpartition(")")[2].split()[3])
            if session in sessions or str(folder).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_six_site_simulation_runs_on_both_nodes_of_a_ray_cluster(tmp_path_factory, config, tmp_path):
    data = tmp_path_factory.mktemp("six-sites")
    generate(CohortSpec(train=(2,) * 6, val=(0,) * 6, test=(2,) * 6, seed=5), data, workers=1, progress=False)
    out, lines = tmp_path / "out", []
    run = {"config": config, "num-server-rounds": 1, "local-steps": 1, "out-dir": str(out)}
    temp = Path(tempfile.mkdtemp(prefix="fm-ray-", dir="/tmp"))  # short: Ray's socket paths fit 107 bytes
    try:
        with contextlib.ExitStack() as stack:
            port, client, dashboard = _free_ports(3)
            address = f"127.0.0.1:{port}"
            head = stack.enter_context(ray_node(
                temp / "head", "--head", f"--port={port}", f"--ray-client-server-port={client}",
                "--include-dashboard=false", f"--dashboard-port={dashboard}", "--num-cpus=1",
                '--resources={"node_a": 1}'))
            second = stack.enter_context(ray_node(
                temp / "second", f"--address={address}", "--num-cpus=1", '--resources={"node_b": 1}'))
            wait_for(lambda: len(ray_cluster_nodes(address)) == 2, 120, "both nodes in the Ray cluster")
            # a GPU share on a cluster without a GPU: refused before a run could wait for one forever
            refused = f"cluster at {address} (2 node(s), 2 CPU(s), 0 GPU(s)) has no node that can run a site"
            with pytest.raises(LaunchError, match=re.escape(f"{refused} asking for 1 CPU(s) and 0.5 GPU(s)")):
                simulate(data, run, home=tmp_path / "refused", gpus_per_site=0.5, ray_address=address)
            outcome = simulate(data, run, home=tmp_path / "flower", timeout_s=420, echo=lines.append,
                               ray_address=address, cpus_per_site=1)
            runs = client_app_runs(address)
        assert head.returncode is not None and second.returncode is not None
        wait_for(lambda: not _left_over({head.pid, second.pid}, temp), 30, "every Ray process stopped")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert outcome.ok, (outcome.status, outcome.details, outcome.log.read_text()[-3000:])
    assert lines[0] == f"the Ray cluster at {address}: 2 node(s), 2 CPU(s), 0 GPU(s); 2 of 6 sites at a time"
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["sites"]) == 6 and (out / "report" / "report.md").is_file()
    # one ClientApp call per site and message, and both nodes ran some
    assert set(runs) == {"node_a", "node_b"}, runs
    assert sum(runs.values()) % 6 == 0 and sum(runs.values()) >= 12, runs
