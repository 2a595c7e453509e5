"""What differential privacy costs (issue 5): test AUC against ε for central DP and for local DP-SGD on the
synthetic study-like setting, and DP-SGD's time and peak memory per step against plain training. Prints
Markdown tables.

    .venv/bin/python bench/bench_privacy.py auc [--data DIR] [--rounds 2] [--arms none,central,local]
                                                [--central-noise 4,1,0.1,0.001] [--out /tmp/fedmammo-privacy]
    .venv/bin/python bench/bench_privacy.py steps [--sizes 64x64,128x96,256x192] [--steps 3]

- auc: the study-like cohort (`configs/study.toml`'s [synth]: 380/40/40 training exams, 120 test exams a
  site; `--data` reuses one already made) at 64×64 views, GroupNorm model in every arm; the federation runs
  in this process (the real ServerApp and ClientApps, `tests/test_federation_support`'s in-process Grid: no
  Ray, no SuperLink), FedAvg, one local epoch a round. Arms: no DP; central DP (server-side fixed clipping
  at norm 1) at four noise multipliers; local DP-SGD at three target ε and at z = 0.001. The AUC is the
  report's pooled test AUC (DeLong 95% CI), ε the report's.
- steps: one process per arm and size (so that each peak is its own): `client.train.train_epochs` on
  random views, batch 8, one torch thread; CPU-seconds per step after a warm-up step (the difference of a
  1- and a (1 + steps)-step call, so without Opacus's set-up of each call), and the peak RSS growth during
  training over the RSS before it. DP-SGD's batches are Poisson-sampled: 8 exams on average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import torch  # noqa: E402
from bench_train import synthetic_exams  # noqa: E402

from client.dp import PrivateSGD  # noqa: E402
from client.train import train_epochs  # noqa: E402
from common.cli import main as fedmammo  # noqa: E402
from common.config import Config, config_from_dict, load_config  # noqa: E402
from common.model import build_model  # noqa: E402

CENTRAL_CLIP = 1.0
"""Central DP's clipping norm (server-side fixed clipping)."""
ARMS = ("plain, BatchNorm", "plain, GroupNorm", "DP-SGD", "DP-SGD, chunks of 2")


def _auc(args: argparse.Namespace) -> None:
    from test_federation_support import run_in_process

    out = Path(args.out).resolve()
    data = Path(args.data) if args.data else out / "data"
    if not (data / "cohort.json").is_file():
        fedmammo(["synth", str(data), "--config", str(ROOT / "configs" / "study.toml")])
    base = (f'[data]\nimage_size = [64, 64]\nworkers = 2\ncache_dir = "{out / "cache"}"\n\n'
            '[model]\nnorm = "group"\n\n[train]\nbatch_size = 8\nnum_threads = 1\n')
    central = {"central-dp": "server-fixed", "dp-clipping-norm": CENTRAL_CLIP, "dp-sampled-sites": 3}
    arms = {"none": [("no DP", "", {})],
            "central": [(f"central DP, z = {z:g}", "", {**central, "dp-noise-multiplier": z})
                        for z in map(float, args.central_noise.split(","))],
            "local": [(f"DP-SGD, target ε = {e:g}", f"\n[privacy]\ndp_sgd = true\ntarget_epsilon = {e}\n", {})
                      for e in map(float, filter(None, args.local_epsilon.split(",")))]
            + [(f"DP-SGD, z = {z:g}", f"\n[privacy]\ndp_sgd = true\nnoise_multiplier = {z}\n", {})
               for z in map(float, filter(None, args.local_noise.split(",")))]}
    rows = [_untrained(data, base, out)] if "none" in args.arms.split(",") else []
    # several processes may run parts of the arms (`--arms`) side by side: one folder each
    for name, privacy, settings in [arm for part in args.arms.split(",") for arm in arms[part]]:
        run = out / "runs" / f"{name.replace(' ', '')}-{time.strftime('%H%M%S')}"
        run.mkdir(parents=True)
        (run / "config.toml").write_text(base + privacy)
        cpu, wall = time.process_time(), time.perf_counter()
        run_in_process(data, {"config": str(run / "config.toml"), "num-server-rounds": args.rounds,
                              "local-epochs": 1, "eval-every": 0, "out-dir": str(run / "out"), **settings})
        report = json.loads((run / "out" / "report" / "report.json").read_text())
        model = report["evaluation"]["raters"]["model"]
        central, local = report["privacy"]["central"], report["privacy"]["local"]
        if central["mode"] != "none":
            spent = f"{central['epsilon']:.3g}"
        elif local["dp_sgd"]:
            spent = " / ".join(f"{s['epsilon']:.3g}" for _, s in sorted(local["sites"].items()))
        else:
            spent = "∞"
        low, high = model["auc_ci"] or (float("nan"), float("nan"))
        rows.append(f"| {name} | {spent} | {model['auc']:.3f} ({low:.3f}–{high:.3f}) "
                    f"| {time.process_time() - cpu:.0f} | {time.perf_counter() - wall:.0f} |")
        print(rows[-1], flush=True)
    counts = report["sites"]
    train = "/".join(str(s["counts"]["train"]["exams"]) for s in counts)
    test = sum(s["counts"]["test"]["exams"] for s in counts)
    print(f"\n### Test AUC vs ε: {len(counts)} sites, train {train} exams, {test} test exams, 64×64 views, "
          f"GroupNorm, FedAvg, {args.rounds} rounds × 1 local epoch, δ = 1e-5\n")
    print("| arm | ε spent (DP-SGD: per site) | pooled test AUC (95% CI) | CPU-s | wall s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def _untrained(data: Path, config_text: str, out: Path) -> str:
    """The row of the initial model, before any round: a model that barely moves keeps its AUC, which is
    not 0.5 (random features and a random head still rank the lesions' looks, one way or the other)."""
    from client.data import exam_set
    from client.evaluate import predict
    from client.prepare import prepare_site
    from common.model import initial_model
    from common.sites import site_folders
    from common.stats import auc_ci

    (out / "untrained.toml").write_text(config_text)
    config = load_config(out / "untrained.toml")
    test = exam_set([prepare_site(site, config, progress=False) for site in site_folders(data)], "test")
    auc, low, high = auc_ci(test.malignant.numpy(), predict(initial_model(config), test, config).score)
    return f"| initial model, untrained | 0 | {auc:.3f} ({low:.3f}–{high:.3f}) | | |"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _one_arm(arm: str, height: int, width: int, steps: int) -> dict[str, float]:
    """Train `steps` steps after one warm-up step in this process; CPU-s per step and peak RSS growth."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    norm = "batch" if arm == ARMS[0] else "group"
    privacy = {"dp_sgd": True, "noise_multiplier": 1.0}
    chunk = 2 if "chunks" in arm else 0
    config: Config = config_from_dict({"data": {"image_size": [height, width]}, "model": {"norm": norm},
                                       "train": {"batch_size": 8, "num_threads": 1,
                                                 "physical_batch_size": chunk},
                                       **({"privacy": privacy} if "DP" in arm else {})})
    model = build_model(config.model, False)
    n = 64
    data, _ = synthetic_exams(n, (height, width))
    generator = torch.Generator().manual_seed(0)

    def train(k: int) -> float:
        """CPU-seconds of `k` steps, Opacus's set-up included."""
        private = PrivateSGD(config.privacy, 8, 8 / n, 1.0, [], chunk) if "DP" in arm else None
        cpu = time.process_time()
        train_epochs(model, data, config, steps=k, generator=generator, progress=False, private=private)
        return time.process_time() - cpu

    before = _rss_kib()
    train(1)  # warm-up
    seconds = (train(1 + steps) - train(1)) / steps  # without the per-call set-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"cpu_s_per_step": seconds, "peak_mib": peak / 1024}


def _steps(args: argparse.Namespace) -> None:
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print("\n### DP-SGD vs plain training: CPU-seconds per step (batch 8, 1 thread) and peak memory growth "
          "during training\n")
    print("| views | " + " | ".join(f"{a}: CPU-s/step | {a}: peak MiB" for a in ARMS) + " |")
    print("|---|" + "---:|---:|" * len(ARMS))
    for height, width in sizes:
        cells = []
        for arm in ARMS:
            command = [sys.executable, __file__, "one", arm, str(height), str(width), str(args.steps)]
            result = subprocess.run(command, capture_output=True, text=True, check=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            cells += [f"{measured['cpu_s_per_step']:.2f}", f"{measured['peak_mib']:.0f}"]
        print(f"| {height}×{width} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    auc = sub.add_parser("auc")
    auc.add_argument("--data", help="a study-like cohort already made (`fedmammo synth`)")
    auc.add_argument("--rounds", type=int, default=2)
    auc.add_argument("--arms", default="none,central,local", help="which arms: none, central, local")
    auc.add_argument("--local-epsilon", default="1,8,64", help="DP-SGD's target ε per site for the run")
    auc.add_argument("--local-noise", default="0.001",
                     help="DP-SGD arms set by noise multiplier, no budget (0.001: clipping without noise)")
    auc.add_argument("--central-noise", default="4,1,0.1,0.001",
                     help="central DP's noise multipliers (server-side fixed clipping at norm 1)")
    auc.add_argument("--out", default="/tmp/fedmammo-privacy")
    steps = sub.add_parser("steps")
    steps.add_argument("--sizes", default="64x64,128x96,256x192")
    steps.add_argument("--steps", type=int, default=3)
    one = sub.add_parser("one")  # a single measurement, in its own process (see `_steps`)
    one.add_argument("arm", choices=ARMS)
    for name in ("height", "width", "steps"):
        one.add_argument(name, type=int)
    args = parser.parse_args()
    if args.part == "auc":
        _auc(args)
    elif args.part == "steps":
        _steps(args)
    else:
        print(json.dumps(_one_arm(args.arm, args.height, args.width, args.steps)))


if __name__ == "__main__":
    main()
