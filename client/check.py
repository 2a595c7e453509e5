"""`fedmammo check DIR`: what a site runs before joining a federation.

It prepares the site exactly as training does (`client.prepare.prepare_site`, so what check accepts is what
training uses) and reports: files and exams found, complete and usable; how many of the usable exams' views
are acquired and how many generated 2D images (`[data] generated_2d`); per split, the exams carrying each
target (a pathology, a 2–5 BI-RADS read) and their balance; warnings (a patient in several splits, a DICOM
PatientID that contradicts its label row); every rejected file, label row or exam with its reason. Exit
status 0 when some exam is usable, 1 when none is, 2 when the folder, its labels file or the config cannot
be used at all.

`--views OUT` also writes what the model sees: each usable exam's model input, one 8-bit greyscale PNG per
view at the configured image size, `<exam_id>_<VIEW>.png` (`write_views`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.prepare import PreparedSite, prepare_site
from common.atomic import write_atomic
from common.config import load_config
from common.labels import SPLITS

DENSITIES = ("a", "b", "c", "d", "")
"""BI-RADS densities, and "" for unknown."""
VIEW_NAMES = ("CC", "MLO", "CONTRA_CC", "CONTRA_MLO")
"""The views of each exam of `PreparedSite.views` in order (the contralateral ones with `bilateral =
true`)."""


def split_table(site: PreparedSite) -> dict[str, dict[str, Any]]:
    """Per split, of the usable exams: how many, with a pathology (benign, malignant) or none, with a 2–5
    BI-RADS read (the BI-RADS head's target), per density, symptomatic."""
    table = {}
    for split in SPLITS:
        labels = [label for label in site.labels if label.split == split]
        density = Counter(label.density for label in labels)
        table[split] = {
            "exams": len(labels),
            "benign": sum(label.malignant is False for label in labels),
            "malignant": sum(label.malignant is True for label in labels),
            "no_pathology": sum(label.malignant is None for label in labels),
            "birads_target": sum(label.birads_target is not None for label in labels),
            "density": {d or "unknown": density[d] for d in DENSITIES},
            "symptomatic": sum(label.symptomatic is True for label in labels),
        }
    return table


def warnings_of(site: PreparedSite, splits: dict[str, dict[str, Any]]) -> list[str]:
    """What will make training or evaluation weak or wrong even though exams are usable."""
    out = []
    for split, row in splits.items():
        labelled = row["benign"] + row["malignant"]
        if labelled and not (row["benign"] and row["malignant"]):
            out.append(f"split {split} has {row['benign']} benign and {row['malignant']} malignant exams: "
                       "its AUC cannot be computed")
        if row["exams"] and not labelled and not row["birads_target"]:
            out.append(f"split {split}: no exam has a pathology or a 2–5 BI-RADS read: it can be scored, "
                       "not trained or evaluated")
    if not splits["train"]["exams"]:
        out.append("no usable training exams: this site cannot train")
    splits_of: dict[str, set[str]] = {}
    for label in site.labels:
        splits_of.setdefault(label.patient_id, set()).add(label.split)
    leaked = sorted(p for p, s in splits_of.items() if len(s) > 1)
    if leaked:
        shown = ", ".join(f"{p} ({'/'.join(sorted(splits_of[p]))})" for p in leaked[:5])
        out.append(f"{len(leaked)} patient(s) have exams in several splits, so evaluation sees patients it "
                   f"trained on: {shown}{' …' if len(leaked) > 5 else ''}")
    return out + site.warnings


def report(site: PreparedSite, root: Path) -> dict[str, Any]:
    """Everything check found, as JSON-ready data."""
    splits = split_table(site)
    return {
        "site": site.name,
        "folder": str(root.resolve()),
        "labelled": site.labelled,
        "counts": site.counts,
        "splits": splits,
        "warnings": warnings_of(site, splits),
        "exams": [{"exam_id": e, "split": label.split, "malignant": label.malignant,
                   "birads": label.birads}
                  for e, label in zip(site.exam_ids, site.labels, strict=True)],
        "rejections": [{"source": r.source, "kind": r.kind, "reason": r.reason} for r in site.rejections],
    }


def summary(data: dict[str, Any]) -> str:
    """The report as text for a person."""
    counts = data["counts"]
    lines = [
        f"Site {data['site']} ({data['folder']})",
        f"Files: {counts['files']} read, {counts['views']} mammography views",
        f"Exams: {counts['exams_labelled']} labelled, {counts['exams_complete']} complete (CC + MLO), "
        f"{counts['exams_usable']} usable"
        + ("" if data["labelled"] else " (no labels.csv: exams are scored, not trained on or evaluated)"),
        f"Views of usable exams: {counts.get('views_acquired', 0)} acquired 2D, "
        f"{counts.get('views_generated', 0)} generated 2D (synthesized from tomosynthesis)",
        "",
        "| split | exams | benign | malignant | no pathology | BI-RADS 2–5 | density a/b/c/d/unknown "
        "| symptomatic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, row in data["splits"].items():
        density = "/".join(str(row["density"][d or "unknown"]) for d in DENSITIES)
        lines.append(f"| {split} | {row['exams']} | {row['benign']} | {row['malignant']} | "
                     f"{row['no_pathology']} | {row['birads_target']} | {density} | {row['symptomatic']} |")
    lines += [f"warning: {w}" for w in data["warnings"]]
    if "views" in data:
        written = sum(len(names) for names in data["views"]["files"].values())
        lines += ["", f"Model inputs: {written} PNG files in {data['views']['folder']}"]
    rejections = data["rejections"]
    lines += ["", f"Rejected: {len(rejections)}"]
    for kind, n in Counter(r["kind"] for r in rejections).most_common():
        lines.append(f"  {kind}: {n}")
    for r in rejections:
        lines.append(f"  {r['source']}: {r['reason']}")
    return "\n".join(lines)


def safe_name(exam_id: str) -> str:
    """`exam_id` as a file name: every character but ASCII letters, digits, '.', '-' and '_' becomes '_'
    (a manifest's study key may hold '/' or spaces), and so does a leading '.'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", exam_id)
    return "_" + name[1:] if name.startswith(".") else name


def file_names(exam_ids: Sequence[str]) -> list[str]:
    """Each exam's file-name stem, `safe_name(exam_id)`; two exams whose safe names collide are told apart
    by a hash of the exam id (`<name>-<8 hex digits>`)."""
    names: list[str] = []
    for exam_id in exam_ids:
        name = safe_name(exam_id)
        names.append(f"{name}-{hashlib.sha256(exam_id.encode()).hexdigest()[:8]}" if name in names else name)
    return names


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit PNG of `pixels` (greyscale (H, W) or RGB (H, W, 3), values in [0, 1]), written atomically."""
    from PIL import Image  # matplotlib's dependency; only the commands that write PNGs need it

    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue(), durable=False)


def write_views(site: PreparedSite, out: Path) -> dict[str, list[str]]:
    """Each usable exam's model input as 8-bit greyscale PNGs in `out` (created), one per view,
    `<name>_<VIEW>.png` (`file_names`). Returns exam id → its file names."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for index, (exam_id, name) in enumerate(zip(site.exam_ids, file_names(site.exam_ids), strict=True)):
        files[exam_id] = []
        for view, pixels in zip(VIEW_NAMES, site.read(index), strict=False):
            write_png(out / f"{name}_{view}.png", pixels.astype(np.float32))
            files[exam_id].append(f"{name}_{view}.png")
    return files


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    try:
        config = load_config(args.config)
        site = prepare_site(root, config, progress=sys.stderr.isatty())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = report(site, root)
    if getattr(args, "views", None):
        try:
            folder = Path(args.views)
            data["views"] = {"folder": str(folder.resolve()), "files": write_views(site, folder)}
        except OSError as exc:
            print(f"error: {args.views}: cannot write the views: {exc}", file=sys.stderr)
            return 2
    print(summary(data))
    if args.json:
        try:
            write_atomic(Path(args.json), json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            print(f"error: {args.json}: cannot write the report: {exc}", file=sys.stderr)
            return 2
    if not site.exam_ids:
        print(f"error: {root}: no usable exam", file=sys.stderr)
        return 1
    return 0
