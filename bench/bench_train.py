"""Benchmark (a): training exams/s of the project's loop against a plain PyTorch loop, same model and size.

The project's loop is `client.train.train_epochs` with everything it does: shuffled order, class weighting,
float16 views streamed from the view cache (one `.npy` per view, `client.data.stream`) and converted per
batch, batched augmentation (affine, intensity, noise), the
multi-task loss, progress accounting. The plain loop is the floor: the same model, optimizer and loss over
pre-loaded float32 batches, no augmentation and no shuffling. Both run in the same process, alternating
in rounds after a warm-up, so machine load hits both alike; the table gives the median of the per-round
ratios with their min and max, so a noisy machine shows as spread, not as a regression. Each is timed by
wall clock and, on CPU, by the process's CPU time too (robust to other processes on a shared machine;
with one thread the CPU time is the work done). The ratio project/plain should be ≥ 0.95: the data
pipeline never starves the model. The project loop's exams/s is also the rate at which training consumes
exams, against which DICOM reading is compared (benchmark (b)).

    .venv/bin/python bench/bench_train.py [--sizes 128x96,256x192] [--precisions fp32,bf16] [--steps 24]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from client.data import ExamSet, exam_set
from client.device import resolve_runtime
from client.prepare import site_from_arrays
from client.train import make_optimizer, train_epochs
from common.config import Config
from common.labels import ExamLabel
from common.model import MultiTaskLoss, build_model
from common.runtime import seed_everything, set_threads


def synthetic_exams(n: int, size: tuple[int, int], seed: int = 0) -> tuple[ExamSet, np.ndarray]:
    """`n` random exams (~14% malignant, as in the study) as view files in a temporary cache, the stream's
    input, and the same views as an array, the plain loop's."""
    rng = np.random.default_rng(seed)
    views = rng.random((n, 2, *size), dtype=np.float32).astype(np.float16)
    birads = rng.integers(0, 4, n)
    labels = [ExamLabel(f"p{i}", f"1.2.{i}", "L", i % 7 == 0, 2 + int(birads[i]), "c", False, "train")
              for i in range(n)]
    return exam_set([site_from_arrays("bench", views, labels)]), views


def timed(run, runtime) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `run()`, waiting for the device at the end."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def plain_loop(model, optimizer, criterion, tensors, runtime, steps: int, batch: int) -> None:
    """`steps` training steps over pre-loaded float32 batches on the device."""
    views, malignant, birads = tensors
    model.train()
    for step in range(steps):
        i = (step * batch) % len(views)
        with runtime.autocast():
            outputs = model(views[i : i + batch])
        loss = criterion(outputs, malignant[i : i + batch], birads[i : i + batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def bench(size: tuple[int, int], precision: str, steps: int, warmup: int, rounds: int, batch: int) -> dict:
    config = Config()
    config.data.image_size = size
    config.train.batch_size = batch
    config.train.precision = precision
    runtime = resolve_runtime(config.train)
    data, views = synthetic_exams(batch * steps, size)
    seed_everything(0)
    model = runtime.place(build_model(config.model, bilateral=False))
    optimizer = make_optimizer(model, config)
    n_pos = float(data.malignant.sum())
    criterion = MultiTaskLoss(config.model.birads_loss_weight, (len(data) - n_pos) / n_pos).to(runtime.device)
    loaded = (torch.from_numpy(views).float(), data.malignant, data.birads_class)
    tensors = [t.to(runtime.device) for t in loaded]
    generator = seed_everything(1)

    loops = {
        "plain": lambda n: plain_loop(model, optimizer, criterion, tensors, runtime, n, batch),
        "project": lambda n: train_epochs(model, data, config, steps=n, optimizer=optimizer, runtime=runtime,
                                          generator=generator, progress=False),
    }
    for loop in loops.values():
        timed(lambda loop=loop: loop(warmup), runtime)
    per_round = max(1, steps // rounds)
    exams = per_round * batch
    wall: dict[str, list[float]] = {name: [] for name in loops}
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            w, c = timed(lambda loop=loop: loop(per_round), runtime)
            wall[name].append(exams / w)
            cpu[name].append(exams / c)
    # A round's ratio compares the two loops under the same load; their median, min and max show a noisy
    # machine as spread instead of as a lower mean.
    return {"wall": {k: float(np.median(v)) for k, v in wall.items()},
            "ratio": [p / q for p, q in zip(wall["project"], wall["plain"], strict=True)],
            "cpu_ratio": [p / q for p, q in zip(cpu["project"], cpu["plain"], strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x96,256x192", help="view sizes HxW, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16", help="train.precision values to measure")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternations of the two loops (one ratio each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    set_threads(args.threads)
    device = resolve_runtime(Config().train).device
    name = f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    print(f"Training throughput, dual-view DenseNet-121, batch {args.batch}, {args.steps} timed steps per "
          f"loop after {args.warmup} warm-up, {args.rounds} alternating rounds; {name}; "
          f"torch {torch.__version__}\n")
    print("| view size | precision | plain loop (exams/s, median) | project loop (exams/s, median) "
          "| ratio per round: median (min–max) | by CPU time: median (min–max) |")
    print("|---|---|---|---|---|---|")
    for text in args.sizes.split(","):
        h, w = (int(v) for v in text.split("x"))
        for precision in args.precisions.split(","):
            rates = bench((h, w), precision, args.steps, args.warmup, args.rounds, args.batch)
            wall = rates["wall"]
            by_cpu = _spread(rates["cpu_ratio"]) if device.type == "cpu" else "n/a"
            print(f"| {h}×{w} | {precision} | {wall['plain']:.2f} | {wall['project']:.2f} "
                  f"| {_spread(rates['ratio'])} | {by_cpu} |", flush=True)


def _spread(ratios: list[float]) -> str:
    return f"{np.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"

if __name__ == "__main__":
    main()
