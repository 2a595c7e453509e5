"""Many sites in one simulation: a federation of 6, 12 and 24 small synthetic sites runs to its report, and
the memory of the center and of the Ray workers is sampled throughout. Prints Markdown tables.

    .venv/bin/python bench/bench_sites.py [--sites 6,12,24] [--rounds 2] [--workers 8]

Each site has a few exams at 64×48; one local step a round. Ray is told of one CPU per site, up to
`--workers` sites training at once (each a Ray worker process, a ClientAppActor serving sites in turn),
and its object store is kept small (5% of memory: a message's 27 MB weights are its largest objects).
Every 0.25 s the process tree under this bench is read from /proc: RSS (resident pages, shared libraries
included) and PSS (shared pages divided among the processes that map them, so that sums are honest):
- center: the `flwr-simulation` process, which runs the ServerApp and drives the simulation (Flower's
  in-memory link state, where messages wait, lives there too);
- workers: the Ray worker processes running ClientApps (`ray::ClientAppActor`);
- the rest: SuperLink, SuperExec, Ray's raylet, GCS, idle workers and helpers.
The center's peak against the number of sites tells whether it holds per-site copies of the model: the
replies of one round (one update per site, 27 MB in float32) are all it should hold, and only until they
are aggregated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import load_config  # noqa: E402
from common.model import initial_model  # noqa: E402
from common.synth.generate import CohortSpec, generate  # noqa: E402
from server.launch import simulate  # noqa: E402
from server.state import exchanged_keys  # noqa: E402

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            tree[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    return tree


def _role(pid: int) -> str | None:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "flwr-simulation" in command:
        return "center"
    if command.startswith("ray::ClientAppActor"):
        return "worker"
    return "other"


def _memory_mib(pid: int) -> tuple[float, float] | None:
    """(RSS, PSS) of a process in MiB."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]  # after the address range
        values = dict(line.split(":", 1) for line in lines if ":" in line)
        return int(values["Rss"].split()[0]) / 1024, int(values["Pss"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


class Sampler(threading.Thread):
    """Peak RSS and PSS per process and peak sums per role, under this process, until stopped."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.done = interval_s, threading.Event()
        self.peak: dict[int, tuple[str, float, float]] = {}
        self.peak_sum: dict[str, float] = defaultdict(float)
        self.center: list[float] = []
        """The center's RSS at each sample: whether what it holds at the peak is released afterwards."""

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            tree, todo, sums = _children(), [os.getpid()], defaultdict(float)
            while todo:
                pid = todo.pop()
                todo += tree.get(pid, [])
                if pid == os.getpid() or (role := _role(pid)) is None or (memory := _memory_mib(pid)) is None:
                    continue
                rss, pss = memory
                if role == "center":
                    self.center.append(rss)
                _, peak_rss, peak_pss = self.peak.get(pid, (role, 0.0, 0.0))
                self.peak[pid] = (role, max(peak_rss, rss), max(peak_pss, pss))
                sums[role] += pss
            for role, pss in sums.items():
                self.peak_sum[role] = max(self.peak_sum[role], pss)

    def stop(self) -> None:
        self.done.set()
        self.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="6,12,24")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=8,
                        help="sites training at once (Ray worker processes)")
    parser.add_argument("--out", default="/tmp/fedmammo-sites")
    args = parser.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "small.toml"
    config.write_text(f'[data]\nimage_size = [64, 48]\nworkers = 0\ncache_dir = "{work / "cache"}"\n\n'
                      "[train]\nbatch_size = 4\nnum_threads = 1\naugment = false\n")
    model = initial_model(load_config(config))
    model_mib = sum(model.state_dict()[k].numel() for k in exchanged_keys(model, "average")) * 4 / 2**20
    # Ray's object store (shared memory) defaults to 30% of the machine's memory
    os.environ.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", "0.05")
    results = []
    for n in [int(s) for s in args.sites.split(",")]:
        data = work / f"cohort-{n}"
        if not (data / "cohort.json").is_file():
            generate(CohortSpec(train=(4,) * n, val=(1,) * n, test=(4,) * n, seed=5), data, progress=False)
        out = work / f"run-{n}-{time.strftime('%H%M%S')}"
        sampler = Sampler()
        sampler.start()
        started = time.perf_counter()
        outcome = simulate(data, {"config": str(config), "num-server-rounds": args.rounds, "local-steps": 1,
                                  "eval-every": 0, "min-nodes": n, "out-dir": str(out)},
                           home=work / f"flower-{n}", timeout_s=3600,
                           federation_config={"init-args-num-cpus": min(n, args.workers)})
        wall = time.perf_counter() - started
        sampler.stop()
        if not outcome.ok:
            sys.exit(f"{n} sites: {outcome.status} {outcome.details} (log {outcome.log})")
        report = out / "report" / "report.md"
        roles = defaultdict(list)
        for role, rss, pss in sampler.peak.values():
            roles[role].append((rss, pss))
        results.append((n, wall, report.is_file(), roles, dict(sampler.peak_sum), sampler.center))
        print(f"{n} sites: {outcome.status} in {wall:.0f} s, report {report}", flush=True)

    print(f"\n### {args.rounds} rounds, 64×48 views, 1 local step, up to {args.workers} sites at once "
          f"(model {model_mib:.1f} MiB fp32)\n")
    print("| sites | run wall (s) | report | center peak RSS (MiB) | center peak PSS (MiB) "
          "| center RSS at the end (MiB) | workers | worker peak RSS, median (max) (MiB) "
          "| workers' peak PSS sum (MiB) | rest peak PSS sum (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, wall, ok, roles, sums, series in results:
        center = max(roles["center"])
        workers = [rss for rss, _ in roles["worker"]]
        print(f"| {n} | {wall:.0f} | {'yes' if ok else 'no'} | {center[0]:.0f} | {center[1]:.0f} "
              f"| {series[-1]:.0f} | {len(workers)} | {statistics.median(workers):.0f} ({max(workers):.0f}) "
              f"| {sums.get('worker', 0):.0f} | {sums.get('other', 0):.0f} |")
    if len(results) > 1:
        (n0, *_, roles0, _, _), (n1, *_, roles1, _, _) = results[0], results[-1]
        slope = (max(roles1["center"])[0] - max(roles0["center"])[0]) / (n1 - n0)
        print(f"\nCenter peak RSS per added site: {slope:.1f} MiB ({slope / model_mib:.2f}× the fp32 model)")


if __name__ == "__main__":
    main()
