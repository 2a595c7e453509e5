"""Seconds per study of `fedmammo predict` on new studies (no labels), on this machine's CPU.

    .venv/bin/python bench/bench_predict.py [--studies 12]

Writes one synthetic site (four views per study, at the demo's detector scale and at twice it), copies
its study folders without labels.csv into an "incoming" folder, as a hospital would drop new patients'
studies, saves an untrained model with its metadata as the weights (the cost does not depend on the
weights), then runs `fedmammo predict incoming --weights W --json OUT` end to end in this process: every
header read, every view decoded and preprocessed in the worker pool, the model run on every breast.
Prints a Markdown table: seconds per study, first run (nothing cached; predict keeps no cache unless the
config names a cache_dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common.checkpoint import model_metadata, save_checkpoint
from common.cli import main as fedmammo
from common.config import Config
from common.model import initial_model
from common.synth.generate import CohortSpec, generate

CASES = [(0.125, (128, 96)), (0.125, (256, 192)), (0.25, (512, 384))]
"""(detector scale of the synthetic files, model input size per view)."""


def _incoming(site: Path, to: Path) -> int:
    """The site's study folders, without its labels: what `predict` gets for new patients."""
    studies = sorted({p.parent for p in site.rglob("*.dcm")})
    for i, study in enumerate(studies):
        shutil.copytree(study, to / f"study-{i:04d}")
    return len(studies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12, help="studies per case (one breast exam each)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU core(s), load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    lines = ["| detector scale | input per view | studies | breasts scored | seconds per study |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for scale, size in CASES:
            root = Path(tmp) / f"s{scale}-{size[0]}"
            generate(CohortSpec(train=(0,), val=(0,), test=(args.studies,), scale=scale), root / "cohort",
                     progress=False)
            site = next(p for p in (root / "cohort").iterdir() if p.is_dir())
            studies = _incoming(site, root / "incoming")
            config = Config()
            config.data = dataclasses.replace(config.data, image_size=size)
            weights = root / "weights.safetensors"
            save_checkpoint(weights, initial_model(config).state_dict(), model_metadata(config))
            out = root / "predictions.json"
            started = time.perf_counter()
            command = ["predict", str(root / "incoming"), "--weights", str(weights), "--json", str(out)]
            code = fedmammo(command)
            seconds = time.perf_counter() - started
            if code != 0:
                raise SystemExit(f"predict failed with exit code {code}")
            scored = len(json.loads(out.read_text())["exams"])
            lines.append(f"| {scale} | {size[0]}×{size[1]} | {studies} | {scored} | "
                         f"{seconds / studies:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
