"""Exams/s of DICOM read + preprocess at real detector sizes: one process, the worker pool, the cache.

    .venv/bin/python bench/bench_read.py [--exams 4] [--workers 1,2,0]

Writes full-size MG files (a smooth breast phantom with quantum-like noise, as `tests/dicom_factory.py`
draws it) uncompressed and as JPEG 2000 lossless, into a temporary site folder per case, then times:
`decode_view` file after file in this process (also its CPU time, which a busy machine distorts less
than wall time); `prepare_site` with a pool of each size in `--workers` (0 = one per core; the first pass,
cache empty, each worker writing its views to the cache); `prepare_site` again (every view from the cache).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import label_row, mg_dataset, phantom, save, to_stored, uid, write_labels

from client.prepare import decode_files, decode_view, prepare_site
from common.config import Config

DETECTORS = [((3328, 2560), 12), ((2294, 1914), 14)]
"""(rows, columns), bits stored: an 85 µm 12-bit detector and a 100 µm 14-bit one."""
STORAGE = {"uncompressed": ExplicitVRLittleEndian, "JPEG 2000 lossless": JPEG2000Lossless}
OUTPUTS = [(128, 96), (512, 384)]


def write_site(root: Path, exams: int, shape: tuple[int, int], bits: int, syntax: str) -> list[Path]:
    rng = np.random.default_rng(0)
    rows, paths = [], []
    for i in range(exams):
        study, laterality = str(uid("bench", root.name, i)), "LR"[i % 2]
        for view in ("CC", "MLO"):
            image = phantom(*shape, laterality, view, seed=i) + rng.normal(0.0, 0.004, shape)
            ds = mg_dataset(to_stored(image, bits), study=study, patient=f"B{i}", laterality=laterality,
                            view=view, bits=bits, window=(2 ** (bits - 1), 2**bits * 0.9))
            paths.append(save(ds, root / f"B{i}" / f"{view}.dcm", syntax))
        rows.append(label_row(study, laterality, patient=f"B{i}"))
    write_labels(root, rows)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exams", type=int, default=4, help="exams (2 views each) per case")
    parser.add_argument("--workers", default="1,0", help="pool sizes, comma-separated (0 = one per core)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    pools = [int(w) or cores for w in args.workers.split(",")]
    print(f"{args.exams} exams per case; pools of {pools} worker(s) on {cores} CPU core(s); "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    lines = [
        "| detector | storage | MB/view | model input | 1 process, CPU-s/exam | 1 process, exams/s | "
        + "".join(f"pool of {n}, exams/s | " for n in pools) + "cached, exams/s |",
        "|---|---|---|---|---|---|" + "---|" * len(pools) + "---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench_read_") as tmp:
        for shape, bits in DETECTORS:
            for storage, syntax in STORAGE.items():
                root = Path(tmp) / f"{shape[0]}x{shape[1]}_{syntax}"
                paths = write_site(root, args.exams, shape, bits, syntax)
                megabytes = np.mean([p.stat().st_size for p in paths]) / 2**20
                decode_view(paths[0], OUTPUTS[0])  # imports torch here
                decode_files(paths[:1], OUTPUTS[0], 1, 600.0)  # starts the fork server once
                for size in OUTPUTS:
                    started, cpu = time.perf_counter(), time.process_time()
                    for path in paths:
                        assert not isinstance(decode_view(path, size), str)
                    single = args.exams / (time.perf_counter() - started)
                    cpu_per_exam = (time.process_time() - cpu) / args.exams
                    pooled = []
                    for workers in pools:
                        config = Config()
                        config.data.image_size, config.data.workers = size, workers
                        cache = Path(tmp) / f"cache_{root.name}_{size[0]}_{workers}"
                        started = time.perf_counter()
                        site = prepare_site(root, config, cache_dir=cache, progress=False)
                        pooled.append(args.exams / (time.perf_counter() - started))
                        assert len(site.exam_ids) == args.exams, site.rejections
                    started = time.perf_counter()
                    prepare_site(root, config, cache_dir=cache, progress=False)
                    cached = args.exams / (time.perf_counter() - started)
                    lines.append(f"| {shape[0]}×{shape[1]}, {bits}-bit | {storage} | {megabytes:.1f} | "
                                 f"{size[0]}×{size[1]} | {cpu_per_exam:.2f} | {single:.2f} | "
                                 + "".join(f"{rate:.2f} | " for rate in pooled) + f"{cached:.0f} |")
                    print(lines[-1], file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
