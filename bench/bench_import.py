"""`fedmammo import` and `fedmammo check` on a 2,000-exam fixture of each public dataset's format.

    .venv/bin/python bench/bench_import.py [--exams 2000] [--results bench/RESULTS.md] [--no-check]

Writes, in a temporary folder, a dataset in each format's published layout (RSNA `train.csv` +
`train_images/`; VinDr-Mammo's three CSVs + `images/<study>/<image>.dicom`; CBIS-DDSM's four CSVs + its
tree with full, cropped and ROI-mask folders; CMMD's clinical CSV + `CMMD/<ID1>/…/1-1.dcm`), `--exams`
exams each (1 patient = 2 breasts × CC + MLO). The images are tiny (64×48) but real and distinct DICOM
files (each its own SOPInstanceUID, as `check` rejects repeats), written from one template per breast and
view with the UID patched in, so that writing the fixture costs seconds; the importer reads CSVs (and, for
CBIS-DDSM and CMMD, every header) and copies no image. Then times, as a user runs them (a fresh process
each): `fedmammo import FORMAT SRC OUT`, then `fedmammo check` on every site folder written (default
config: every image decoded and preprocessed in the worker pool). Prints a Markdown table and appends it
to `--results` with the date, the machine's load and the exact command.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from dicom_factory import mg_dataset, phantom, to_stored  # noqa: E402
from pydicom import config as pydicom_config  # noqa: E402
from pydicom.uid import SecondaryCaptureImageStorage  # noqa: E402

UID_STEM = "1.2.826.0.1.3680043.10.999."
WIDTH = 12
"""Digits of the counter patched into each file's SOPInstanceUID (fixed width: the file keeps its length)."""
PLACEHOLDER = UID_STEM + "9" * WIDTH
HEX_PLACEHOLDER = "f" * 32
SIDES = ("L", "R")
VIEWS = ("CC", "MLO")


def template(laterality: str, view: str, kind: str) -> bytes:
    """One file's bytes with a placeholder SOPInstanceUID: `kind` rsna (stripped), vindr (de-identified,
    hex UID), cbis (Secondary Capture) or cmmd (tags)."""
    mode = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE  # VinDr's hex UIDs
    try:
        return _template(laterality, view, kind)
    finally:
        pydicom_config.settings.writing_validation_mode = mode


def _template(laterality: str, view: str, kind: str) -> bytes:
    ds = mg_dataset(to_stored(phantom(64, 48, laterality, view, 0)), laterality=laterality, view=view,
                    sop=HEX_PLACEHOLDER if kind == "vindr" else PLACEHOLDER,
                    laterality_tag=None if kind in ("rsna", "cbis") else "ImageLaterality",
                    view_tag=None if kind in ("rsna", "cbis") else "ViewPosition",
                    orientation=None if kind in ("rsna", "cbis") else ())
    if kind == "cbis":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SeriesDescription = "full mammogram images"
    if kind == "vindr":
        ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4"
        ds.Manufacturer = "SIEMENS"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Writer:
    """Distinct files from templates: the placeholder UID replaced by a counter of the same length."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.templates = {(s, v): template(s, v, kind) for s in SIDES for v in VIEWS}
        self.count = 0

    def write(self, path: Path, laterality: str, view: str) -> str:
        self.count += 1
        if self.kind == "vindr":
            new, old = f"{self.count:032x}", HEX_PLACEHOLDER
        else:
            new, old = f"{UID_STEM}{self.count:0{WIDTH}d}", PLACEHOLDER
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.templates[laterality, view].replace(old.encode(), new.encode()))
        return new


def write_csv(path: Path, columns: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def rsna(root: Path, patients: int) -> None:
    writer, rows = Writer("rsna"), []
    for p in range(patients):
        patient = str(10000 + p)
        for laterality in SIDES:
            for view in VIEWS:
                image_id = str(writer.count + 1)
                writer.write(root / "train_images" / patient / f"{image_id}.dcm", laterality, view)
                rows.append([1 + p % 2, patient, image_id, laterality, view, 55.0, int(p % 40 == 0),
                             int(p % 20 == 0), 0, ("0", "1", "2", "")[p % 4], 0, "ABCD"[p % 4], 49 + p % 3,
                             "False"])
    write_csv(root / "train.csv", ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer",
                                   "biopsy", "invasive", "BIRADS", "implant", "density", "machine_id",
                                   "difficult_negative_case"], rows)


def vindr(root: Path, patients: int) -> None:
    writer, rows, metadata = Writer("vindr"), [], []
    for p in range(patients):
        study, series = f"{p:032x}", f"{p + 10**9:032x}"
        for laterality in SIDES:
            for view in VIEWS:
                image = f"{writer.count + 1:032x}"
                writer.write(root / "images" / study / f"{image}.dicom", laterality, view)
                rows.append([study, series, image, laterality, view, 64, 48, f"BI-RADS {1 + p % 5}",
                             f"DENSITY {'ABCD'[p % 4]}", "training" if p % 5 else "test"])
                metadata.append([series, image, "F", "050Y", ("SIEMENS", "Planmed")[p % 2], "model"])
    columns = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
               "breast_birads", "breast_density", "split"]
    write_csv(root / "breast-level_annotations.csv", columns, rows)
    finding_columns = [*columns[:-1], "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax",
                       "split"]
    write_csv(root / "finding_annotations.csv", finding_columns,
              [[*r[:-1], "['No Finding']", "", "", "", "", "", r[-1]] for r in rows])
    write_csv(root / "metadata.csv", ["Series Instance UID", "SOP Instance UID", "Patient's Sex",
                                      "Patient's Age", "Manufacturer", "Manufacturer's Model Name"], metadata)


def cbis(root: Path, patients: int) -> None:
    """Each full image with one abnormality's crop and ROI mask folder (skipped by the importer)."""
    writer = Writer("cbis")
    tables: dict[str, list[list[object]]] = {name: [] for name in ("mass_train", "mass_test", "calc_train",
                                                                    "calc_test")}
    for p in range(patients):
        patient = f"P_{p + 1:05d}"
        kind = ("Mass", "Calc")[p % 2]
        split = ("Training", "Test")[int(p % 5 == 0)]
        for laterality in SIDES:
            side = {"L": "LEFT", "R": "RIGHT"}[laterality]
            for view in VIEWS:
                top = f"{kind}-{split}_{patient}_{side}_{view}"
                full = f"{top}/1.3.6.1.4.1.9590.{p}/1.3.6.1.4.1.9590.{p}.{view}/000000.dcm"
                writer.write(root / "CBIS-DDSM" / full, laterality, view)
                crop = f"{top}_1/1.3.6.1.4.1.9590.{p}.1/1.3.6.1.4.1.9590.{p}.2/000000.dcm"
                roi = crop.replace("000000.dcm", "000001.dcm")
                for part in (crop, roi):
                    writer.write(root / "CBIS-DDSM" / part, laterality, view)
                table = f"{kind.lower()}_{'train' if split == 'Training' else 'test'}"
                pathology = ("BENIGN", "MALIGNANT", "BENIGN_WITHOUT_CALLBACK")[p % 3]
                tables[table].append([patient, 1 + p % 4, side, view, 1, kind.lower(), "OVAL",
                                      "CIRCUMSCRIBED", 2 + p % 4, pathology, 3, full, crop, roi + "\n"])
    for name, rows in tables.items():
        kind, split = name.split("_")
        density = "breast_density" if kind == "mass" else "breast density"
        write_csv(root / f"{kind}_case_description_{split}_set.csv",
                  ["patient_id", density, "left or right breast", "image view", "abnormality id",
                   "abnormality type", "shape", "margins", "assessment", "pathology", "subtlety",
                   "image file path", "cropped image file path", "ROI mask file path"], rows)


def cmmd(root: Path, patients: int) -> None:
    writer, rows = Writer("cmmd"), []
    for p in range(patients):
        patient = f"D1-{p + 1:04d}"
        for laterality in SIDES:
            for n, view in enumerate(VIEWS, start=1 if laterality == "L" else 3):
                writer.write(root / "CMMD" / patient / "07-18-2010-NA-NA-1" / "1.000000-NA-1" / f"1-{n}.dcm",
                             laterality, view)
            rows.append([patient, laterality, 50, 2, "mass", ("Benign", "Malignant")[p % 2], ""])
    write_csv(root / "CMMD_clinicaldata_revision.csv",
              ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"], rows)


FORMATS = {"rsna": rsna, "vindr": vindr, "cbis-ddsm": cbis, "cmmd": cmmd}


def fedmammo(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=ROOT, capture_output=True,
                          text=True)
    return time.perf_counter() - started, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exams", type=int, default=2000, help="exams per format (2 per patient)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="append the table here "
                                                                                     "('' = print only)")
    parser.add_argument("--no-check", action="store_true", help="time the import only")
    args = parser.parse_args()
    patients = args.exams // 2
    load = os.getloadavg()
    print(f"{args.exams} exams per format; load average {load[0]:.1f}", file=sys.stderr)
    lines = ["| format | exams | files in SRC | fixture written (s) | `import` (s) | site folders | "
             "`check` (s, all sites) | usable exams |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        for fmt, make in FORMATS.items():
            src, out = Path(tmp) / fmt / "src", Path(tmp) / fmt / "out"
            src.mkdir(parents=True)
            started = time.perf_counter()
            make(src, patients)
            written = time.perf_counter() - started
            files = sum(len(names) for _, _, names in os.walk(src))
            seconds, done = fedmammo("import", fmt, str(src), str(out))
            if done.returncode != 0:
                print(done.stdout, done.stderr, file=sys.stderr)
                raise SystemExit(f"import {fmt} failed")
            sites = sorted(p for p in out.iterdir() if (p / "labels.csv").is_file())
            exams = sum(len((p / "labels.csv").read_text().splitlines()) - 1 for p in sites)
            check, usable = "not run", "–"
            if not args.no_check:
                total, usable_n = 0.0, 0
                for site in sites:
                    report = Path(tmp) / f"{site.name}.json"
                    took, done = fedmammo("check", str(site), "--json", str(report))
                    total += took
                    if done.returncode != 0 or not report.is_file():
                        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                        usable = "check failed"
                        break
                    usable_n += json.loads(report.read_text())["counts"]["exams_usable"]
                else:
                    usable = str(usable_n)
                check = f"{total:.1f}"
            line = (f"| {fmt} | {exams} | {files} | {written:.1f} | {seconds:.1f} | {len(sites)} | {check} "
                    f"| {usable} |")
            print(line, file=sys.stderr)
            lines.append(line)
    table = "\n".join(lines)
    print(table)
    if args.results:
        end = os.getloadavg()
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(args.results, "a") as f:
            text = (f"Measured {stamp} on the 2-core machine, load {load[0]:.1f} at the start and "
                    f"{end[0]:.1f} at the end. Each format's fixture in its published layout (tiny 64×48 "
                    "DICOM, one distinct file per image; CBIS-DDSM also one crop and one ROI mask per image, "
                    "which the importer skips). `import` and `check` each in a fresh process, as a user runs "
                    "them (`check` with the default config: every image decoded and preprocessed to 256×192 "
                    "by the worker pool; no cache). No image is copied: OUT holds only the CSVs.")
            f.write(f"\n## Dataset import (issue 14) — `python bench/bench_import.py --exams {args.exams}`"
                    f"\n\n{textwrap.fill(text, 105)}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
