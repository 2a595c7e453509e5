"""Benchmark (a) of issue 15: peak host memory of training against the site's size, views streamed.

For each site size, a fresh process writes that many random two-view exams at the given view size into a
view cache (one `.npy` per view, as `client.prepare` writes them, one view in memory at a time), then
trains `client.train.train_epochs` for `--steps` steps over the whole site (the epoch's order and plan
drawn over every exam) and reports its peak RSS (`ru_maxrss`). The site's views in memory, as before
streaming, would add N × 2 × H × W × 2 bytes.

    python bench/bench_memory.py [--exams 250,1000,4000] [--size 512x384] [--steps 4] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(exams: int, size: tuple[int, int], steps: int, workers: int) -> dict[str, float]:
    sys.path[:0] = [str(ROOT)]
    import numpy as np

    from client.data import exam_set
    from client.prepare import PreparedSite, write_view
    from client.train import train_epochs
    from common.config import Config
    from common.labels import ExamLabel
    from common.model import build_model

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        views, labels = [], []
        for i in range(exams):
            files = (folder / f"{i}-cc.npy", folder / f"{i}-mlo.npy")
            for file in files:
                write_view(file, rng.random(size, dtype=np.float32).astype(np.float16))
            views.append(files)
            labels.append(ExamLabel(f"p{i}", f"1.2.{i}", "L", i % 7 == 0, 2 + i % 4, "c", False, "train"))
        written = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        config = Config()
        config.data.image_size, config.data.loader_workers = size, workers
        config.train.batch_size = 8
        data = exam_set([PreparedSite("bench", [x.exam_id for x in labels], views, labels)], "train")
        model = build_model(config.model, bilateral=False)
        start = time.perf_counter()
        stats = train_epochs(model, data, config, steps=steps, progress=False)
        return {"exams": exams, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_writing_mib": written / 1024, "steps": stats.steps,
                "train_s": time.perf_counter() - start,
                "in_memory_mib": exams * 2 * size[0] * size[1] * 2 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exams", default="250,1000,4000")
    parser.add_argument("--size", default="512x384")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="[data] loader_workers")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.one:
        print(json.dumps(one(args.one, size, args.steps, args.workers)))  # type: ignore[arg-type]
        return
    print(f"Peak RSS of training {args.steps} steps (batch 8) at {size[0]}×{size[1]}, loader workers "
          f"{args.workers}; each size in a fresh process\n")
    print("| exams | peak RSS (MiB) | vs the smallest | the site's views in memory would be (MiB) |")
    print("|---|---|---|---|")
    first = None
    for n in (int(v) for v in args.exams.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--size", args.size, "--steps",
                              str(args.steps), "--workers", str(args.workers)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.splitlines()[-1])
        first = first or row["peak_rss_mib"]
        print(f"| {n} | {row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / first:.2f}× "
              f"| {row['in_memory_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
