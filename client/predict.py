"""`fedmammo predict`: score a site's exams with trained weights."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from client.data import exam_tensors
from client.device import resolve_runtime
from client.evaluate import metrics, predict
from client.prepare import prepare_site
from client.train import load_weights
from common.atomic import write_atomic
from common.checkpoint import config_of, flat_config, load_checkpoint
from common.config import load_config
from common.model import build_model
from common.runtime import set_threads

MUST_MATCH = ("data.image_size", "data.bilateral", "model.norm")
"""Settings a --config must share with the weights' own config."""


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
        site = prepare_site(Path(args.dir), config, progress=sys.stderr.isatty())  # cached if config says
        data = exam_tensors([site], args.split)
        if len(data) == 0:
            raise ValueError(f"{args.dir}: no usable exams in split {args.split!r}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rejection in site.rejections:
        print(f"skipped {rejection.source}: {rejection.reason}", file=sys.stderr)

    predictions = predict(model, data, config, runtime)
    records = predictions.records()
    truth = data.malignant.numpy()
    width = max(len("exam"), *(len(r["exam_id"]) for r in records))
    print(f"{'exam':<{width}}  score  BI-RADS  pathology")
    for record, malignant in zip(records, truth, strict=True):
        record["malignant"] = bool(malignant)
        pathology = "malignant" if malignant else "benign"
        print(f"{record['exam_id']:<{width}}  {record['malignancy_score']:5.1f}  {record['birads']:>7}  "
              f"{pathology}")
    result = metrics(predictions, data, config)
    print(f"{args.split} ({len(records)} exams): {result.summary()}")
    if args.json:
        report = {"weights": str(weights), "dir": args.dir, "split": args.split, "exams": records,
                  "metrics": result.to_dict()}
        write_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
