"""`fedmammo predict PATH... --weights W`: score new patients' studies, or a site's exams, with trained
weights.

PATH is a site folder (labels.csv and images.csv are used when present: metrics where truth exists), any
folder of DICOM files without labels (one study or many, any layout and file names), or DICOM files.
Every breast with a CC and an MLO view is scored: malignancy 0–100 and BI-RADS 2–5 with the four
probabilities. What cannot be scored (an incomplete breast, a file that is not a mammogram) is listed with
its reason. A breast scores the same wherever its files lie: each view is preprocessed on its own and the
model runs in eval mode.

`--heatmaps DIR` also shows where the model looks (`client.heatmaps`): per view, a PNG of the view as
displayed with its Grad-CAM map and the box of its most salient region, and in the JSON each view's box and
peak in its DICOM file's pixels.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

from client.data import exam_set
from client.device import resolve_runtime
from client.evaluate import Predictions, metrics, predict
from client.prepare import PreparedSite, prepare_files, prepare_site
from client.train import load_weights
from common.atomic import write_atomic
from common.checkpoint import config_of, load_checkpoint
from common.config import Config, flat_config, load_config
from common.model import BIRADS_CLASSES, build_model
from common.runtime import set_threads

MUST_MATCH = ("data.image_size", "data.bilateral", "model.norm")
"""Settings a --config must share with the weights' own config."""


def _site(paths: list[str], config: Config, progress: bool) -> PreparedSite:
    """One folder is read as a site (labels and manifest when it has them); files, or several paths, as
    new studies."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return prepare_site(Path(paths[0]), config, progress=progress)  # cached if the config says so
    return prepare_files("studies", [Path(p) for p in paths], config, progress=progress)


def rows(site: PreparedSite, predictions: Predictions) -> list[dict[str, Any]]:
    """One JSON-ready record per scored exam: the prediction, the exam's keys, and its truth if known."""
    out = []
    for record, label in zip(predictions.records(), site.labels, strict=True):
        record |= {"patient_id": label.patient_id, "study_uid": label.study_uid,
                   "laterality": label.laterality}
        if label.malignant is not None:
            record["malignant"] = label.malignant
        out.append(record)
    return out


def to_csv(records: list[dict[str, Any]]) -> str:
    columns = ["exam_id", "patient_id", "study_uid", "laterality", "malignancy_score", "birads",
               *(f"p_birads_{c}" for c in BIRADS_CLASSES), "malignant"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        probabilities = {f"p_birads_{c}": f"{p:.4f}" for c, p in r["birads_probabilities"].items()}
        malignant = "" if "malignant" not in r else int(r["malignant"])
        writer.writerow({**{k: r[k] for k in columns[:5]}, "malignancy_score": f"{r['malignancy_score']:.1f}",
                         "birads": r["birads"], **probabilities, "malignant": malignant})
    return out.getvalue()


def run(args: argparse.Namespace) -> int:
    weights = Path(args.weights)
    try:
        checkpoint = load_checkpoint(weights)
        stored = config_of(checkpoint, weights)
        config = stored if args.config is None else load_config(args.config)
        mine, theirs = flat_config(config), flat_config(stored)
        for key in MUST_MATCH:
            if mine[key] != theirs[key]:
                raise ValueError(f"{args.config}: {key} = {mine[key]!r}, but {weights} was trained with "
                                 f"{theirs[key]!r}")
        runtime = resolve_runtime(config.train)
        set_threads(config.train.num_threads)
        # The checkpoint holds every weight, so ImageNet initialisation is not needed (nor its file).
        model = build_model(dataclasses.replace(config.model, pretrained=None), config.data.bilateral)
        load_weights(model, checkpoint, weights)
        site = _site(args.paths, config, progress=sys.stderr.isatty())
        split = args.split or ("test" if site.labelled else "all")
        if split != "all" and not site.labelled:
            raise ValueError(f"{', '.join(args.paths)}: no labels.csv, so no splits: use --split all")
        site = site.split(split)
        data = exam_set([site], "all")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rejection in site.rejections:
        print(f"not scored {rejection.source}: {rejection.reason}", file=sys.stderr)
    if len(data) == 0:
        print(f"error: {', '.join(args.paths)}: no exam with a CC and an MLO view to score"
              + (f" in split {split!r}" if site.labelled else ""), file=sys.stderr)
        return 1

    predictions = predict(model, data, config, runtime)
    records = rows(site, predictions)
    if args.heatmaps:
        from client.heatmaps import heatmaps

        try:
            for record, views in zip(records, heatmaps(model, site, config, runtime, Path(args.heatmaps)),
                                     strict=True):
                record["views"] = views
        except (ValueError, OSError) as exc:
            print(f"error: heatmaps: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {len(records)} exams' heatmaps to {args.heatmaps}")
    width = max(len("exam"), *(len(r["exam_id"]) for r in records))
    print(f"{'exam':<{width}}  score  BI-RADS  pathology")
    for r in records:
        pathology = {True: "malignant", False: "benign"}.get(r.get("malignant"), "-")
        print(f"{r['exam_id']:<{width}}  {r['malignancy_score']:5.1f}  {r['birads']:>7}  {pathology}")
    result = metrics(predictions, data, config) if bool(data.has_pathology.any()) else None
    if result is not None:
        print(f"{split} ({len(records)} exams): {result.summary()}")
    report = {"weights": str(weights), "paths": args.paths, "split": split, "exams": records,
              "not_scored": [{"source": r.source, "reason": r.reason} for r in site.rejections],
              "metrics": result and result.to_dict()}
    try:
        if args.json:
            write_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json}")
        if args.csv:
            write_atomic(Path(args.csv), to_csv(records))
            print(f"wrote {args.csv}")
    except OSError as exc:
        print(f"error: cannot write the predictions: {exc}", file=sys.stderr)
        return 2
    return 0
