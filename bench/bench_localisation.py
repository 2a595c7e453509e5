"""Benchmark (issue 16, point 5): how often `fedmammo predict --heatmaps` points at the lesion.

A synthetic cohort with the demo's settings (`fedmammo synth --config configs/demo.toml`: 3 sites, 60
training and 40 test exams each, scale 0.0625, conspicuity 2.5) records where each lesion lies
(`lesions.csv`). For each view size, `fedmammo train` trains a model on the three sites' training exams
pooled, with the demo's [data], [model] and [train] settings at that size; then `client.heatmaps` maps every
test exam's views as `predict --heatmaps` does, for each Grad-CAM layer asked for. On the labelled breast's
CC and MLO (the views with the lesion), per class:

- box ∋ centre: the salient box contains the lesion's centre;
- box ∩ lesion: the box overlaps the lesion's core disc (IoU > 0);
- peak in lesion: the map's peak lies in the disc (centre and core radius: `lesions.csv`).

Each with its Wilson 95% CI (views of one exam are not independent: the CIs are a little narrow), next to
chance: a box of the same size centred, and a peak put, on a breast pixel drawn uniformly (the exact
expectation over every breast pixel of the model's input, mapped to the file's pixels). `no map`: views whose
map is empty (the view only lowers the score): no box, counted as misses, chance 0. `box/breast`: the box's
area over the breast's (0 without a box). `view's peak / exam's`: the lesion view's map peak over the
highest of the exam's views (1: this view drives the score; bilateral models also look at the other
breast's views).

    PYTHONPATH=. python bench/bench_localisation.py [--sizes 64x48,128x96] \
        [--layers features,features.denseblock3] [--epochs N] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"


def _fedmammo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "common.cli", *args], check=True, cwd=ROOT)


def _lesions(cohort: Path) -> dict[Path, dict[str, float]]:
    with (cohort / "lesions.csv").open() as f:
        return {(cohort / row["file"]).resolve(): {"row": float(row["row"]), "col": float(row["col"]),
                                                    "radius": float(row["radius"]),
                                                    "malignant": row["malignant"] == "1"}
                for row in csv.DictReader(f)}


def _hits(boxes: np.ndarray, peaks: np.ndarray, lesion: dict[str, float]) -> np.ndarray:
    """(n, 3) booleans: box ∋ centre, box ∩ disc, peak in disc, for boxes (n, 4: top, bottom, left, right,
    whole pixels, half-open) and peaks (n, 2: row, col), in pixel indices."""
    r, c, radius = lesion["row"], lesion["col"], lesion["radius"]
    # Pixel i spans [i − 0.5, i + 0.5) in index coordinates.
    top, bottom, left, right = (boxes[:, 0] - 0.5, boxes[:, 1] - 0.5, boxes[:, 2] - 0.5, boxes[:, 3] - 0.5)
    contains = (top <= r) & (r < bottom) & (left <= c) & (c < right)
    gap = np.hypot(np.clip(r, top, bottom) - r, np.clip(c, left, right) - c)
    peak = np.hypot(peaks[:, 0] - r, peaks[:, 1] - c) <= radius
    return np.stack([contains, gap <= radius, peak], axis=1)


def measure(cohort: Path, run: Path, layers: list[str]) -> dict[str, dict]:
    """Per Grad-CAM layer and class: hit counts, chance expectations, box/breast; and the test AUC."""
    import torch

    from client.data import exam_set
    from client.device import resolve_runtime
    from client.evaluate import metrics, predict
    from client.heatmaps import grad_cam, view_record
    from client.prepare import prepare_site
    from client.train import load_weights
    from common.checkpoint import config_of, load_checkpoint
    from common.dicom import read_view
    from common.model import build_model
    from common.preprocess import preprocess

    weights = run / "best.safetensors"
    checkpoint = load_checkpoint(weights)
    config = config_of(checkpoint, weights)
    model = build_model(dataclasses.replace(config.model, pretrained=None), config.data.bilateral)
    load_weights(model, checkpoint, weights)
    runtime = resolve_runtime(config.train)
    sites = [prepare_site(d, config, cache_dir=run / "cache", progress=False).split("test")
             for d in sorted(p for p in cohort.iterdir() if p.is_dir())]
    data = exam_set(sites, "all")
    auc = metrics(predict(model, data, config, runtime), data, config)
    truth = _lesions(cohort)
    size = config.data.image_size
    results: dict[str, dict] = {layer: {"malignant": [], "benign": []} for layer in layers}
    for site in sites:
        for index in range(len(site.exam_ids)):
            views = torch.from_numpy(site.read(index)[None].astype(np.float32))
            for layer in layers:
                cams = grad_cam(model, views, layer)[0].numpy()
                for v in (0, 1):  # the labelled breast's CC and MLO
                    source, cam, pixels = site.sources[index][v], cams[v], site.read(index)[v]
                    lesion = truth[source.path.resolve()]
                    record = view_record(source, cam, size, float(cams.max()), None)
                    view = read_view(source.path, source.listed)
                    _, geometry = preprocess(view.pixels, size, view.flipped)
                    rows, cols = np.nonzero(pixels > 0)  # the breast in the model's input
                    centres = np.array([geometry.to_source((r + 0.5, r + 0.5, c + 0.5, c + 0.5))[::2]
                                        for r, c in zip(rows, cols, strict=True)]) - 0.5
                    row_scale, col_scale = geometry.scale()
                    if record["box"] is None:
                        hit, chance, share = np.zeros(3, bool), np.zeros(3), 0.0
                    else:
                        box = record["box"]
                        hit = _hits(np.array([[box[k] for k in ("top", "bottom", "left", "right")]]),
                                    np.array([[record["peak"]["row"], record["peak"]["col"]]]), lesion)[0]
                        height, width = box["bottom"] - box["top"], box["right"] - box["left"]
                        shifted = np.stack([np.round(centres[:, 0] + 0.5 - height / 2),
                                            np.round(centres[:, 0] + 0.5 - height / 2) + height,
                                            np.round(centres[:, 1] + 0.5 - width / 2),
                                            np.round(centres[:, 1] + 0.5 - width / 2) + width], axis=1)
                        chance = _hits(shifted, centres, lesion).mean(axis=0)
                        share = height * width / (len(rows) * row_scale * col_scale)
                    kind = "malignant" if lesion["malignant"] else "benign"
                    results[layer][kind].append({"hit": hit.tolist(), "chance": chance.tolist(),
                                                 "box_share": share,
                                                 "relative_peak": record["relative_peak"]})
    return {"auc": auc.to_dict(), "layers": results}


def table(size: str, measured: dict) -> list[str]:
    from common.stats.binary import wilson

    def cell(hits: list[bool], chance: list[float]) -> list[str]:
        p = wilson(int(sum(hits)), len(hits))
        return [f"{p.value:.2f} [{p.lo:.2f}, {p.hi:.2f}]", f"{np.mean(chance):.2f}"]

    lines = []
    auc = "n/a" if measured["auc"]["auc"] is None else f"{measured['auc']['auc']:.3f}"
    for layer, classes in measured["layers"].items():
        for kind in ("malignant", "benign"):
            rows = classes[kind]
            hits, chance = np.array([r["hit"] for r in rows]), np.array([r["chance"] for r in rows])
            cells = [c for k in range(3) for c in cell(list(hits[:, k]), list(chance[:, k]))]
            empty = sum(r["box_share"] == 0 for r in rows)
            lines.append(f"| {size} | {auc} | {layer} | {kind} | {len(rows)} | {empty} | " + " | ".join(cells)
                         + f" | {np.mean([r['box_share'] for r in rows]):.2f}"
                         + f" | {np.mean([r['relative_peak'] for r in rows]):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x48,128x96", help="view sizes HxW (default 64x48,128x96)")
    parser.add_argument("--layers", default="features,features.denseblock3",
                        help="Grad-CAM layers (default: the trunk's last map, and denseblock3's)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the demo's, 8)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the demo's, one per core; 1 on "
                                                    "a machine shared with other jobs)")
    parser.add_argument("--out", help="working folder (default: a temporary one; an existing one's cohort "
                                      "and trained runs are reused)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-localisation-"))
    cohort = out / "cohort"
    if not (cohort / "lesions.csv").is_file():
        _fedmammo("synth", str(cohort), "--config", str(DEMO))
    header = ["| view size | test AUC | Grad-CAM layer | class | views | no map | box ∋ centre [95% CI] "
              "| chance | box ∩ lesion [95% CI] | chance | peak in lesion [95% CI] | chance | box/breast "
              "| view's peak / exam's |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = []
    for size in args.sizes.split(","):
        height, width = (int(x) for x in size.split("x"))
        run = out / f"run-{size}"
        config = run / "config.toml"
        run.mkdir(parents=True, exist_ok=True)
        text = re.sub(r"image_size = \[\d+, \d+\]", f"image_size = [{height}, {width}]", DEMO.read_text())
        if args.epochs:
            text = re.sub(r"\nepochs = \d+", f"\nepochs = {args.epochs}", text)
        if args.threads:
            text = text.replace("\n[train]\n", f"\n[train]\nnum_threads = {args.threads}\n")
        config.write_text(text)
        start = time.perf_counter()
        if not (run / "best.safetensors").is_file():
            _fedmammo("train", *(str(p) for p in sorted(cohort.iterdir()) if p.is_dir()), "--config",
                      str(config), "--out", str(run))
        trained = time.perf_counter() - start
        measured = measure(cohort, run, args.layers.split(","))
        measured["train_s"] = trained
        (run / "localisation.json").write_text(json.dumps(measured, indent=1))
        lines += table(size, measured)
        measured_s = time.perf_counter() - start - trained
        print(f"{size}: trained in {trained:.0f} s, measured in {measured_s:.0f} s", file=sys.stderr)
        print("\n".join(header + lines), flush=True)


if __name__ == "__main__":
    main()
