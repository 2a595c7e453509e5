"""What the federation costs: fedmammo's per-round overhead against a bare Flower app's, in simulation and
on a loopback deployment over TLS, the bytes a site exchanges per round against the model's fp32 size,
and a whole run against the same training without Flower. Prints Markdown tables.

    .venv/bin/python bench/bench_federation.py [--rounds 3] [--out /tmp/fedmammo-bench]

- overhead per round = the round's wall time at the server minus the slowest site's local training
  (both from fedmammo's metrics.csv); Flower's own = the round time of a bare app in the same
  federation whose ClientApp returns the model-sized array it gets (no torch, no data);
- a third reference, in deployment, is the bare app importing torch and torchvision in its ClientApp:
  Flower 1.41 starts a fresh ClientApp process for every message, so that import is the floor of any
  PyTorch app's round there; fedmammo's deployment is measured with Flower's own ClientApp processes and
  with `fedmammo superexec` (`client.superexec`), which starts them with PyTorch already imported;
- the whole-run ratio compares the `flwr run` simulation with the same ServerApp and ClientApp called in
  one process (tests/test_federation_support's in-process Grid): same rounds, same training, no Flower.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_federation_support import run_in_process  # noqa: E402

from common.cli import main as fedmammo  # noqa: E402
from common.config import load_config  # noqa: E402
from common.model import initial_model  # noqa: E402
from common.sites import site_folders  # noqa: E402
from common.synth.generate import CohortSpec, generate  # noqa: E402
from server.certs import make_certificates  # noqa: E402
from server.launch import flwr_run, simulate, superlink, supernode, write_connection  # noqa: E402
from server.state import exchanged_keys  # noqa: E402

NOOP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "noop"
version = "0.1.0"

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "noop_app:server"
clientapp = "noop_app:client"

[tool.flwr.app.config]
rounds = 3
values = 1
min-nodes = 3
import-torch = false
aggregate = false
"""
NOOP_APP = '''\
"""A bare Flower app: the server sends a model-sized float32 array, each ClientApp sends it back + 1; with
`aggregate`, the server averages the replies with Flower's own FedAvg aggregation and sends that next."""
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    if context.run_config["import-torch"]:  # what any PyTorch ClientApp pays in a fresh process
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    weights = msg.content["arrays"]["weights"].numpy() + 1
    return Message(RecordDict({"arrays": ArrayRecord({"weights": Array(weights)}),
                               "metrics": MetricRecord({"num-examples": 8})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    weights = np.random.default_rng(0).random(int(context.run_config["values"]), dtype=np.float32)
    aggregate = None  # with `aggregate`: the last round's FedAvg aggregate, sent instead of `weights`
    while len(list(grid.get_node_ids())) < int(context.run_config["min-nodes"]):
        time.sleep(0.5)
    for r in range(1, int(context.run_config["rounds"]) + 1):
        started = time.perf_counter()
        content = RecordDict({"arrays": aggregate or ArrayRecord({"weights": Array(weights)})})
        replies = grid.send_and_receive([Message(content, message_type=MessageType.TRAIN, dst_node_id=n)
                                         for n in grid.get_node_ids()])
        assert all(not m.has_error() for m in replies), [m.error for m in replies if m.has_error()]
        if context.run_config["aggregate"]:
            aggregate = aggregate_arrayrecords([m.content for m in replies], "num-examples")
        log(20, "[fedmammo] noop round %d %.3f", r, time.perf_counter() - started)
'''


def _rounds(out: Path) -> list[tuple[float, float]]:
    """Per training round of a fedmammo run: (wall time at the server, slowest site's local training)."""
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "train"]
    result = []
    for r in sorted({int(r["round"]) for r in rows}):
        mine = [x for x in rows if int(x["round"]) == r]
        wall = next(float(x["seconds"]) for x in mine if x["site"] == "all")
        result.append((wall, max(float(x["seconds"]) for x in mine if x["site"] != "all")))
    return result


def _noop_rounds(lines: list[str]) -> list[float]:
    return [float(line.split()[-1]) for line in lines if line.startswith("noop round")]


PHASES = {
    "center: update screen (NaN/Inf, norms)": ("server.app", "screen_updates"),
    "center: FedAvg aggregation": ("flwr.serverapp.strategy.fedavg", "FedAvg.aggregate_train"),
    "center: checkpoint + metrics.csv (the copy; the write runs beside the next round)":
        ("server.app", "checkpoint_writer"),
    "site: the global weights loaded into a lent model": ("client.app", "_global_model"),
    "site: prepared site (cached in the process)": ("client.app", "_prepared"),
    "site: reply weights packed into one array": ("client.app", "pack_weights"),
    "site: local training (not overhead)": ("client.app", "train_epochs"),
}
"""Where fedmammo's own time goes, per round: the functions timed in the in-process run."""


def _breakdown(data: Path, run: dict, out: Path, rounds: int) -> dict[str, float]:
    """Seconds per round spent in each of PHASES, over a `rounds`-round in-process run (warm caches)."""
    spent = dict.fromkeys(PHASES, 0.0)

    def timed(phase: str, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - started
        return call

    with contextlib.ExitStack() as stack:
        for phase, (module, name) in PHASES.items():
            owner = importlib.import_module(module)
            *path, attribute = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            stack.enter_context(mock.patch.object(owner, attribute, timed(phase, getattr(owner, attribute))))
        run_in_process(data, {**run, "num-server-rounds": rounds, "out-dir": str(out)})
    return {phase: seconds / rounds for phase, seconds in spent.items()}


def _summary(values: list[float]) -> str:
    spread = f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}{spread}"


def _print_breakdown(data: Path, run: dict, runs: Path, rounds: int) -> None:
    print(f"\n### Where fedmammo's own time goes (the same run in one process, {rounds} rounds)\n")
    print("| phase | seconds per round (all sites) |\n|---|---|")
    for phase, seconds in _breakdown(data, run, runs / "breakdown", rounds).items():
        print(f"| {phase} | {seconds:.3f} |")


def _print_overhead(rounds: int, values: int, results: dict) -> None:
    """The per-round table; `results`: mode → (fedmammo's rounds, the bare app's rounds, an outcome), each
    without round 1 (which also starts the processes)."""
    print(f"\n### Per-round overhead, {rounds} rounds, 3 sites, 64×64, 1 local step "
          f"(model {4 * values / 2**20:.1f} MiB fp32)\n")
    print("| mode | round wall (s) | slowest site's training (s) | fedmammo overhead (s) "
          "| bare Flower round (s) | fedmammo / Flower | per site per round: up / down (× fp32 model) |")
    print("|---|---|---|---|---|---|---|")
    for mode, (measured, flower, outcome) in results.items():
        overhead = [wall - compute for wall, compute in measured]
        model_bytes = 4 * values  # weights go up once a round, down once a round and for the evaluation
        up, down = outcome.bytes_in / (3 * rounds), outcome.bytes_out / (3 * (rounds + 1))
        print(f"| {mode} | {_summary([w for w, _ in measured])} | {_summary([c for _, c in measured])} "
              f"| {_summary(overhead)} | {_summary(flower)} "
              f"| {statistics.median(overhead) / statistics.median(flower):.2f} "
              f"| {f'{up / model_bytes:.2f} / {down / model_bytes:.2f}' if outcome.bytes_in else 'n/a'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--demo-rounds", type=int, default=2,
                        help="rounds of the demo-size whole run (0: skip it)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="simulation: runs of the bare app and of fedmammo, alternated")
    parser.add_argument("--simulation-only", action="store_true",
                        help="only the simulation's table and the breakdown (no deployment, no whole run)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="fedmammo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = work / time.strftime("%Y%m%d-%H%M%S")  # this invocation's runs; cohorts and caches are reused

    tiny = work / "tiny.toml"
    tiny.write_text(f'[data]\nimage_size = [64, 64]\nworkers = 1\ncache_dir = "{work / "cache"}"\n\n'
                    "[train]\nbatch_size = 4\nnum_threads = 1\naugment = false\n")
    data = work / "tiny-cohort"
    if not (data / "cohort.json").is_file():
        generate(CohortSpec(train=(8, 8, 8), val=(2, 2, 2), test=(8, 8, 8), seed=3), data, progress=False)
    noop = work / "noop"
    noop.mkdir(exist_ok=True)
    (noop / "pyproject.toml").write_text(NOOP_PYPROJECT)
    (noop / "noop_app.py").write_text(NOOP_APP)
    model = initial_model(load_config(tiny))
    values = sum(model.state_dict()[k].numel() for k in exchanged_keys(model, "average"))
    noop_config = {"rounds": args.rounds, "values": values}
    run = {"config": str(tiny), "num-server-rounds": args.rounds, "local-steps": 1, "eval-every": 0}

    results = {}
    # warm the decoded-view cache, so that no measured round decodes DICOM
    run_in_process(data, {**run, "num-server-rounds": 1, "out-dir": str(runs / "warm")})

    # Ray is told of one CPU per site, so that the three sites train at once as deployed sites do and the
    # slowest site's training is the round's critical path (with 2 CPUs, one site would wait for another)
    at_once = {"init-args-num-cpus": 3}
    sim_rounds: list[tuple[float, float]] = []
    bare_rounds: dict[bool, list[float]] = {False: [], True: []}  # without, with Flower's FedAvg aggregation
    run_bare: dict[bool, list[float]] = {False: [], True: []}  # each run's median round, to show the spread
    run_overhead: list[float] = []
    for i in range(args.repeats):  # alternated, so that a change in the machine's load hits all alike
        for aggregate in (False, True):
            bare: list[str] = []
            home = runs / f"noop-sim-flower-{i}-{aggregate}"  # the bare app in a federation of the same size
            home.mkdir(parents=True, exist_ok=True)
            with superlink(home, simulation=True) as address:
                write_connection(home, "sim", address)
                flwr_run(home, "sim", {**noop_config, "aggregate": aggregate}, app=noop, echo=bare.append,
                         federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1, **at_once})
            bare_rounds[aggregate] += (this_bare := _noop_rounds(bare)[1:])  # round 1 starts the processes
            run_bare[aggregate].append(statistics.median(this_bare))
        sim = simulate(data, {**run, "out-dir": str(runs / f"sim-{i}")}, home=runs / f"sim-flower-{i}",
                       federation_config=at_once)
        sim_rounds += (this_run := _rounds(runs / f"sim-{i}")[1:])
        run_overhead.append(statistics.median(wall - compute for wall, compute in this_run))
    results["simulation"] = (sim_rounds, bare_rounds[False], sim)
    results["simulation, against the bare app + Flower's FedAvg"] = (sim_rounds, bare_rounds[True], sim)

    if args.simulation_only:
        _print_overhead(args.rounds, values, results)
        for aggregate, label in ((False, "the bare app"), (True, "the bare app + Flower's FedAvg")):
            ratios = ", ".join(f"{o / b:.2f}" for o, b in zip(run_overhead, run_bare[aggregate], strict=True))
            print(f"\nEach run's fedmammo / Flower against {label} (medians of its rounds): {ratios}")
        _print_breakdown(data, run, runs, args.rounds)
        return
    certs = runs / "certs"
    make_certificates(certs, ["localhost", "127.0.0.1"])
    torch_floor: list[str] = []
    for warm in (False, True):  # Flower's own ClientApp processes, then `fedmammo superexec`'s warm ones
        mode = "deployment, warm ClientApps" if warm else "deployment (TLS, loopback)"
        out = runs / ("dep-warm" if warm else "dep")
        with contextlib.ExitStack() as stack:
            address = stack.enter_context(superlink(runs / f"center-{out.name}", certs=certs))
            for site in site_folders(data):
                node = {"data-path": str(site), "output-path": str(runs / "hospital" / site.name),
                        "site-name": site.name}
                stack.enter_context(supernode(runs / "nodes" / out.name / site.name, address, node,
                                              root_certificates=certs / "ca.crt", warm=warm))
            home = runs / f"center-{out.name}"
            write_connection(home, "loopback", address, certs / "ca.crt")
            deployed = flwr_run(home, "loopback", {**run, "min-nodes": 3, "out-dir": str(out)})
            bare = []  # the bare app in the same federation, its ClientApps started alike
            flwr_run(home, "loopback", noop_config, app=noop, echo=bare.append)
            if not warm:
                flwr_run(home, "loopback", {**noop_config, "import-torch": True}, app=noop,
                         echo=torch_floor.append)
        results[mode] = (_rounds(out)[1:], _noop_rounds(bare)[1:], deployed)

    _print_overhead(args.rounds, values, results)
    floor = _noop_rounds(torch_floor)
    print(f"\nDeployment, the bare app importing torch + torchvision in its ClientApp: round "
          f"{_summary(floor[1:] or floor)} s")
    _print_breakdown(data, run, runs, args.rounds)

    if args.demo_rounds < 1:
        return
    demo_data = work / "demo-cohort"
    if not (demo_data / "cohort.json").is_file():
        fedmammo(["synth", str(demo_data), "--config", str(ROOT / "configs" / "demo.toml")])
    demo_config = work / "demo.toml"
    demo_config.write_text((ROOT / "configs" / "demo.toml").read_text().replace(
        "[data]\n", f'[data]\ncache_dir = "{work / "demo-cache"}"\n'))
    whole = {"config": str(demo_config), "num-server-rounds": args.demo_rounds, "eval-every": 0}
    run_in_process(demo_data, {**whole, "num-server-rounds": 1, "local-steps": 1,
                               "out-dir": str(runs / "demo-warm")})
    started = time.perf_counter()
    run_in_process(demo_data, {**whole, "out-dir": str(runs / "demo-inprocess")})
    alone = time.perf_counter() - started
    started = time.perf_counter()
    flwr = simulate(demo_data, {**whole, "out-dir": str(runs / "demo-sim")}, home=runs / "demo-flower")
    with_flower = time.perf_counter() - started
    print(f"\n### Whole run at the demo's size ({args.demo_rounds} rounds, 3 × 60 training exams, 128×96)\n")
    print("| run | wall (s) |\n|---|---|")
    print(f"| ServerApp + ClientApps in one process (no Flower transport) | {alone:.0f} |")
    print(f"| `flwr run` simulation ({flwr.status}) | {with_flower:.0f} |")
    print(f"| ratio | {with_flower / alone:.2f} |")


if __name__ == "__main__":
    main()
