"""Benchmark (e): the GPU path at clinical resolution, one script for a lent GPU machine (issue 15).

Prints, for 1024×832 views in bf16 (or the sizes and precisions given):
- the model's measured FLOPs per exam (torch's FlopCounterMode: forward, and forward + backward);
- training exams/s of `client.train.train_epochs` streaming from the view cache, against a plain loop over
  batches already on the GPU (`bench_train.bench`: per-round ratio, median with min–max), with the peak
  GPU memory of the step;
- inference exams/s (`client.evaluate.predict`, inference_mode);
- the view cache's loader: exams/s with 1 worker and with `--workers` workers, against the consumption of
  this GPU (the training rate above) and of an H200 at 40% of its bf16 peak (989 TFLOP/s dense) computed
  from the FLOPs;
- with `--federation N`: N synthetic sites trained at once in simulation, sharing this GPU (Ray is told
  each takes 1/N of it): per round, the wall time and the exams/s of all sites together.

    python bench/bench_gpu.py [--sizes 1024x832] [--precisions bf16] [--batch 16] [--steps 20]
                              [--workers 16] [--federation 3] [--rounds 3]

Runs on the CPU too (slowly; use a small `--sizes`), which is how it is checked when no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_train import bench, synthetic_exams  # noqa: E402

from client.data import chunks, stream  # noqa: E402
from client.device import resolve_runtime  # noqa: E402
from client.evaluate import predict  # noqa: E402
from common.cli import main as cli  # noqa: E402
from common.config import Config  # noqa: E402
from common.model import MultiTaskLoss, build_model  # noqa: E402
from server.launch import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

H200_BF16_FLOPS = 989e12
"""NVIDIA's dense bf16 peak of an H200 (SXM)."""
UTILISATION = 0.4
"""A DenseNet's realistic share of that peak (concatenations and BatchNorm are memory-bound)."""


def flops_per_exam(size: tuple[int, int]) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one two-view exam, counted on the CPU in fp32."""
    model = build_model(Config().model, bilateral=False)
    views = torch.rand(1, 2, *size)
    with FlopCounterMode(display=False) as counter:
        model(views)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        outputs = model(views)
        MultiTaskLoss()(outputs, torch.zeros(1), torch.zeros(1, dtype=torch.int64)).backward()
    return float(forward), float(counter.get_total_flops())


def loader_rate(data, batch: int, workers: int, device: torch.device, batches: int) -> float:
    """Exams/s the cache's loader delivers on `device` (no model), from its first batch on: the workers'
    start (once an epoch, ~seconds) is left out."""
    plan = chunks(torch.arange(len(data)), batch)[:batches]
    batches_read = stream(data, plan, device, workers=workers)
    next(batches_read)
    start = time.perf_counter()
    n = sum(len(b.views) for b in batches_read)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024x832")
    parser.add_argument("--precisions", default="bf16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--loader-only", action="store_true",
                        help="FLOPs and the loader vs an H200 only (benchmark (b), any machine)")
    parser.add_argument("--federation", type=int, default=0,
                        help="also simulate this many sites sharing the GPU (0 = not)")
    parser.add_argument("--exams", type=int, default=96, help="training exams per simulated site")
    args = parser.parse_args()
    if args.loader_only:
        loader_table(args)
        return
    if args.federation:
        federation_table(args)
    runtime = resolve_runtime(Config().train)
    name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; batch {args.batch}\n")
    print("| view size | precision | GFLOP/exam fwd / train | plain (exams/s) | trainer (exams/s) | ratio "
          "median (min–max) | peak GPU memory (GiB) | inference (exams/s) | loader 1 worker / all "
          f"({args.workers}) (exams/s) | H200 at {UTILISATION:.0%} of peak (exams/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for text in args.sizes.split(","):
        size = tuple(int(v) for v in text.split("x"))
        forward, train = flops_per_exam(size)  # type: ignore[arg-type]
        h200 = H200_BF16_FLOPS * UTILISATION / train
        for precision in args.precisions.split(","):
            if runtime.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(runtime.device)
            rates = bench(size, precision, args.steps, 3, args.rounds, args.batch)  # type: ignore[arg-type]
            peak = (torch.cuda.max_memory_allocated(runtime.device) / 2**30
                    if runtime.device.type == "cuda" else float("nan"))
            config = Config()
            config.data.image_size, config.train.batch_size = size, args.batch
            config.train.precision = precision
            data, _ = synthetic_exams(args.batch * 8, size)  # type: ignore[arg-type]
            model = build_model(config.model, bilateral=False)
            predict(model, data, config)  # warm-up
            start = time.perf_counter()
            predict(model, data, config)
            inference = len(data) / (time.perf_counter() - start)
            one = loader_rate(data, args.batch, 1, runtime.device, 8)
            every = loader_rate(data, args.batch, args.workers, runtime.device, 8)
            ratios = sorted(rates["ratio"])
            print(f"| {size[0]}×{size[1]} | {precision} | {forward / 1e9:.0f} / {train / 1e9:.0f} "
                  f"| {rates['wall']['plain']:.1f} | {rates['wall']['project']:.1f} "
                  f"| {ratios[len(ratios) // 2]:.3f} ({ratios[0]:.3f}–{ratios[-1]:.3f}) | {peak:.1f} "
                  f"| {inference:.1f} | {one:.0f} / {every:.0f} | {h200:.0f} |", flush=True)


def federation_table(args: argparse.Namespace) -> None:
    """`--federation N`: N sites of `--exams` synthetic exams at the first size and precision, trained at
    once in simulation on this machine's GPU (1/N each), `--rounds` rounds of one local epoch."""
    size = tuple(int(v) for v in args.sizes.split(",")[0].split("x"))
    precision = args.precisions.split(",")[0]
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_federation_") as tmp:
        config = Path(tmp) / "config.toml"
        text = (ROOT / "configs" / "gpu.toml").read_text()
        settings = {"image_size = [1024, 832]": f"image_size = [{size[0]}, {size[1]}]",
                    'precision = "auto"': f'precision = "{precision}"'}
        for line, setting in settings.items():  # gpu.toml's study setting, at this size and precision
            if line not in text:
                raise SystemExit(f"configs/gpu.toml no longer holds {line!r}: update bench_gpu.py")
            text = text.replace(line, setting)
        config.write_text(text)
        data = Path(tmp) / "data"
        # Matrices near the detector's (scale 0.5: ~1700×1300), so decoding and resizing are realistic.
        train, test = (",".join([str(n)] * args.federation) for n in (args.exams, 16))
        if cli(["synth", str(data), "--sites", str(args.federation), "--train", train, "--test", test,
                "--scale", "0.5"]):
            raise SystemExit("fedmammo synth failed")
        started = time.perf_counter()
        outcome = simulate(data, {"config": str(config), "num-server-rounds": args.rounds, "local-epochs": 1,
                                  "out-dir": str(Path(tmp) / "run")},
                           cpus_per_site=1, gpus_per_site=gpus / args.federation,
                           federation_config={"init-args-num-cpus": len(os.sched_getaffinity(0)),
                                              "init-args-num-gpus": gpus})
        wall = time.perf_counter() - started
        report = json.loads(next((Path(tmp) / "run").rglob("report.json")).read_text())
    print(f"\n{args.federation} sites sharing {gpus} GPU(s), {args.exams} training exams each, "
          f"{size[0]}×{size[1]} {precision}; the run took {wall:.0f} s (synthesis excluded), "
          f"status {outcome.status}\n")
    print("| round | slowest site's training (s) | exams/s, all sites together |")
    print("|---|---|---|")
    for number in sorted({r["round"] for r in report["rounds"] if r.get("phase") == "train"}):
        entries = [r for r in report["rounds"] if r["round"] == number and r.get("phase") == "train"]
        slowest = max(r["seconds"] for r in entries)
        print(f"| {number} | {slowest:.1f} | {sum(r['n'] for r in entries) / slowest:.1f} |", flush=True)


def loader_table(args: argparse.Namespace) -> None:
    """Benchmark (b): the view cache's loader, per worker and with all, against an H200's consumption."""
    print(f"Loader from the view cache, batch {args.batch}, {args.steps} batches, to the CPU "
          f"({len(os.sched_getaffinity(0))} cores); H200 at {UTILISATION:.0%} of its bf16 peak\n")
    print("| view size | GFLOP/exam fwd / train | loader 1 worker (exams/s) | loader all workers (exams/s) "
          "| H200 consumes (exams/s) | workers needed |")
    print("|---|---|---|---|---|---|")
    for text in args.sizes.split(","):
        size = tuple(int(v) for v in text.split("x"))
        forward, train = flops_per_exam(size)  # type: ignore[arg-type]
        h200 = H200_BF16_FLOPS * UTILISATION / train
        data, _ = synthetic_exams(args.batch * args.steps, size)  # type: ignore[arg-type]
        loader_rate(data, args.batch, 0, torch.device("cpu"), args.steps)  # the files into the page cache
        one = loader_rate(data, args.batch, 1, torch.device("cpu"), args.steps)
        every = loader_rate(data, args.batch, args.workers, torch.device("cpu"), args.steps)
        print(f"| {size[0]}×{size[1]} | {forward / 1e9:.0f} / {train / 1e9:.0f} | {one:.0f} | {every:.0f} "
              f"({args.workers}) | {h200:.0f} | {h200 / one:.1f} |", flush=True)


if __name__ == "__main__":
    main()
