"""What every dataset importer shares: records, CSV reading, exams, splits, sites, writing, the summary.

A format module (`common.datasets.rsna`, ...) reads its dataset into an `Imported`: one `Breast` per
labelled breast (its labels, the dataset's own split if it has one, its site key) and one `Image` per
mammogram it found, plus what it skipped and why. `build` then makes the exams (a breast with at least one
CC and one MLO image), gives every patient one split (the dataset's own, else a seeded hash of the patient
id) and one site, and `write_sites` writes each site's `labels.csv` and `images.csv` atomically. `run` is
the `fedmammo import` command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import write_files_atomic
from common.datasets import FORMATS
from common.labels import REQUIRED_COLUMNS

IMAGE_COLUMNS = ("path", "study_uid", "laterality", "view", "patient_id")
"""images.csv's columns (`common.manifest`)."""
VIEWS = ("CC", "MLO")
SPLIT_ORDER = ("train", "val", "test")
"""A patient whose exams the dataset puts in several splits gets the last of these (see `assign_splits`)."""
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.1
"""Seeded splits of datasets without their own (RSNA, CMMD)."""
EXAMPLES = 3
"""Examples kept per skip reason."""


class DatasetError(ValueError):
    """The dataset as a whole cannot be imported (a missing file or column, a bad folder); the message names
    the file, and the row where there is one, and what is wrong."""


@dataclass(frozen=True)
class Options:
    seed: int = 0
    val_fraction: float | None = None
    test_fraction: float | None = None
    sites_by: str = ""
    """A key the format accepts (its `SITES_BY`); "" is its default."""


@dataclass(frozen=True)
class Image:
    path: str
    """Absolute path of the file in the dataset."""
    patient_id: str
    study_uid: str
    laterality: str
    view: str


@dataclass
class Breast:
    """One breast of one study with its labels as labels.csv writes them ("" = the dataset has none)."""

    patient_id: str
    study_uid: str
    laterality: str
    pathology: str = ""
    birads: str = ""
    density: str = ""
    symptomatic: str = ""
    split: str = ""
    """The dataset's own split (train/val/test), or "" where it has none."""
    site: str = ""
    """The site key ("" for the dataset's one site)."""

    @property
    def key(self) -> tuple[str, str]:
        return self.study_uid, self.laterality


@dataclass
class Tally:
    """Counts by reason, with a few examples of each: what an import skipped, or changed."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, item: str, n: int = 1) -> None:
        self.counts[reason] += n
        if len(self.examples[reason]) < EXAMPLES:
            self.examples[reason].append(item)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Imported:
    """What a format module read from its dataset."""

    name: str
    """The dataset's short name; site folders are named after it."""
    breasts: dict[tuple[str, str], Breast]
    """By (study_uid, laterality)."""
    images: list[Image]
    skipped: Tally
    """What was left out (rows, images, breasts), by reason."""
    official_split: bool
    """True where `Breast.split` is the dataset's own split."""
    changed: Tally = field(default_factory=Tally)
    """What was kept but not as the dataset has it (a value left empty where its rows disagree, a patient
    moved to one split or site), by reason."""
    notes: list[str] = field(default_factory=list)
    """Facts about the dataset worth printing with the summary."""
    site_label: str = ""
    """What the site keys are (e.g. 'site_id'), for the summary."""


@dataclass
class Site:
    name: str
    labels: list[Breast]
    images: list[Image]


# --- reading the datasets' files ---------------------------------------------------------------------


def column_key(name: str) -> str:
    """A header as compared: case, surrounding quotes and spaces, and '_' vs ' ' do not matter
    ('breast_density' = 'breast density', 'BIRADS' = 'birads')."""
    return re.sub(r"[\s_]+", " ", name.replace("\ufeff", "").strip().strip('"').strip().lower())


def clean(value: object) -> str:
    """A cell's text: surrounding spaces, stray quotes and line breaks removed."""
    text = "" if value is None else str(value)
    return text.replace("\r", "").replace("\n", "").strip().strip('"').strip()


@dataclass(frozen=True)
class Row:
    where: str
    """`file.csv:LINE`, for messages."""
    values: dict[str, str]
    """By `column_key`."""

    def __getitem__(self, column: str) -> str:
        return self.values.get(column_key(column), "")


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[Row]

    def has(self, column: str) -> bool:
        return column_key(column) in self.columns

    def first_of(self, *names: str) -> str | None:
        """The first of `names` that is a column, or None."""
        return next((name for name in names if self.has(name)), None)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def rows_table(path: Path, header: Sequence[object], records: Iterable[tuple[int, Sequence[object]]],
               required: Sequence[str]) -> Table:
    """A table from a header and numbered records (a CSV's or a spreadsheet's)."""
    columns = [column_key(str(c or "")) for c in header]
    missing = [name for name in required if column_key(name) not in columns]
    if missing:
        shown = ", ".join(str(c) for c in header if str(c or "").strip()) or "none"
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (found: {shown})")
    rows = []
    for line, record in records:
        values = {c: clean(v) for c, v in zip(columns, record, strict=False) if c}
        if any(values.values()):
            rows.append(Row(f"{path.name}:{line}", values))
    return Table(path, columns, rows)


def read_csv(path: Path, required: Sequence[str] = ()) -> Table:
    """A dataset's CSV: UTF-8 with or without a byte-order mark (else Windows-1252), comma-, semicolon- or
    tab-separated, quoted cells with line breaks (CBIS-DDSM's paths). Raises DatasetError when the file is
    missing or unreadable or lacks a `required` column."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found")
    try:
        text = _decode(path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    first = text.splitlines()[0] if text.strip() else ""
    if not first.strip():
        raise DatasetError(f"{path}: empty; its first line must name the columns")
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    try:
        header = next(reader)
        records = []
        start = reader.line_num + 1
        for record in reader:
            records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DatasetError(f"{path}:{reader.line_num}: not a readable CSV row: {exc}") from None
    return rows_table(path, header, records, required)


def find_file(root: Path, names: Sequence[str], depth: int = 2) -> Path | None:
    """The first of `names` (case-insensitive) at `root` or up to `depth` folders below it."""
    wanted = [n.lower() for n in names]
    for level in range(depth + 1):
        found: dict[str, Path] = {}
        for path in sorted(root.glob("/".join(["*"] * (level + 1)))):
            if path.is_file() and path.name.lower() in wanted:
                found.setdefault(path.name.lower(), path)
        for name in wanted:
            if name in found:
                return found[name]
    return None


def side(value: str) -> str | None:
    """L / R from L, R, LEFT, RIGHT (any case); None otherwise."""
    return {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}.get(value.strip().upper())


def image_row(row: Row, key: str, laterality: str, view: str, imported: Imported) -> tuple[str, str] | None:
    """A per-image CSV row's (laterality, view), or None with the reason counted: the exam key `key` and
    `image_id` must be given, the laterality L/R and the view CC or MLO."""
    side_ = side(row[laterality])
    projection = row[view].upper()
    if not row[key] or not row["image_id"]:
        imported.skipped.add(f"row without {key} or image_id", row.where)
    elif side_ is None:
        imported.skipped.add("row with laterality not L or R", f"{row.where} ({row[laterality]!r})")
    elif projection not in VIEWS:
        imported.skipped.add(f"view {projection or 'empty'}: not CC or MLO",
                             f"{row.where} (image {row['image_id']})")
    else:
        return side_, projection
    return None


def number(value: str) -> int | None:
    """An integer cell ('1', '1.0'); None when empty or not a whole number."""
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def agreed(values: Iterable[str], what: str, breast: str, imported: Imported) -> str:
    """The one non-empty value the rows of a breast give; "" (and a note) when they disagree."""
    distinct = sorted({v for v in values if v})
    if len(distinct) > 1:
        imported.changed.add(f"{what} left empty: the breast's rows disagree",
                             f"{breast} ({'/'.join(distinct)})")
        return ""
    return distinct[0] if distinct else ""


def absolute(path: Path) -> str:
    return os.path.abspath(path)


# --- exams, splits, sites ----------------------------------------------------------------------------


def unit_draw(seed: int, patient_id: str, purpose: str) -> float:
    """A number in [0, 1) fixed by seed, purpose and patient: the same patient always draws the same."""
    digest = hashlib.sha256(f"fedmammo-import\0{seed}\0{purpose}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fractions(options: Options, official: bool, name: str) -> tuple[float, float]:
    """(val, test) fractions of patients; checked."""
    if official and options.test_fraction is not None:
        raise DatasetError(f"--test-fraction: {name} has its own test split, which is kept")
    val = options.val_fraction if options.val_fraction is not None else (0.0 if official
                                                                          else DEFAULT_VAL_FRACTION)
    test = 0.0 if official else (options.test_fraction if options.test_fraction is not None
                                 else DEFAULT_TEST_FRACTION)
    for flag, value in (("--val-fraction", val), ("--test-fraction", test)):
        if not 0.0 <= value < 1.0:
            raise DatasetError(f"{flag} {value}: must be at least 0 and below 1")
    if val + test >= 1.0:
        raise DatasetError(f"--val-fraction {val} + --test-fraction {test}: leave some patients to train on")
    return val, test


def assign_splits(breasts: list[Breast], imported: Imported, options: Options) -> None:
    """One split per patient. The dataset's own split where it has one: a patient it puts in several
    splits goes wholly to the last of train, val, test (test stays unseen); with `--val-fraction`, a seeded
    share of its training patients become val. Without one: a seeded hash of the patient id puts the patient
    in test, val or train (`--test-fraction`, `--val-fraction`)."""
    val, test = fractions(options, imported.official_split, imported.name)
    by_patient: dict[str, list[Breast]] = defaultdict(list)
    for breast in breasts:
        by_patient[breast.patient_id].append(breast)
    for patient, own in by_patient.items():
        if imported.official_split:
            splits = {b.split for b in own}
            split = max(splits, key=SPLIT_ORDER.index)
            if len(splits) > 1:
                imported.changed.add(f"patient in several of the dataset's splits: all their exams to "
                                     f"{split}", f"{patient} ({'/'.join(sorted(splits))})")
            if split == "train" and unit_draw(options.seed, patient, "val") < val:
                split = "val"
        else:
            draw = unit_draw(options.seed, patient, "split")
            split = "test" if draw < test else "val" if draw < test + val else "train"
        for breast in own:
            breast.split = split


def assign_sites(breasts: list[Breast], images: dict[tuple[str, str], list[Image]],
                 imported: Imported) -> None:
    """One site per patient: the site key of most of the patient's images (ties: the first key in sort
    order), so that a patient imaged on two machines is never in two sites."""
    by_patient: dict[str, list[Breast]] = defaultdict(list)
    for breast in breasts:
        by_patient[breast.patient_id].append(breast)
    for patient, own in by_patient.items():
        votes: Counter = Counter()
        for breast in own:
            votes[breast.site] += len(images[breast.key])
        site = min(votes, key=lambda key: (-votes[key], key))
        if len(votes) > 1:
            imported.changed.add("patient with images from several sites: all their exams to the site with "
                                 "most of their images", f"{patient} ({'/'.join(sorted(votes))})")
        for breast in own:
            breast.site = site


def site_name(dataset: str, key: str) -> str:
    """A site folder's name: the dataset's name, then its site key, as safe file-name characters."""
    text = f"{dataset}-{key}" if key else dataset
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or dataset


def build(imported: Imported, options: Options) -> list[Site]:
    """Exams from the breasts and images read, each patient in one split and one site; sites by name."""
    grouped: dict[tuple[str, str], list[Image]] = defaultdict(list)
    seen: set[str] = set()
    for image in imported.images:
        if image.path in seen:
            imported.skipped.add("image listed twice by the dataset (kept once)", image.path)
            continue
        seen.add(image.path)
        grouped[image.study_uid, image.laterality].append(image)
    for key, images in grouped.items():
        if key not in imported.breasts:
            for image in images:
                imported.skipped.add("image of a breast without a label row", image.path)
    exams = []
    for key, breast in imported.breasts.items():
        views = {image.view for image in grouped.get(key, [])}
        missing = [v for v in VIEWS if v not in views]
        if missing:
            what = f"{breast.patient_id} {breast.laterality}" + (
                f" (study {breast.study_uid})" if breast.study_uid != breast.patient_id else "")
            reason = ("breast without images" if not views
                      else f"breast without a {' or '.join(missing)} image (not an exam)")
            imported.skipped.add(reason, what)
            continue
        exams.append(breast)
    assign_splits(exams, imported, options)
    assign_sites(exams, grouped, imported)
    sites: dict[str, Site] = {}
    for breast in sorted(exams, key=lambda b: (b.patient_id, b.study_uid, b.laterality)):
        name = site_name(imported.name, breast.site)
        site = sites.setdefault(name, Site(name, [], []))
        site.labels.append(breast)
        site.images += grouped[breast.key]
    for site in sites.values():
        site.images.sort(key=lambda image: (image.patient_id, image.study_uid, image.laterality,
                                            image.view, image.path))
    return [sites[name] for name in sorted(sites)]


# --- writing -----------------------------------------------------------------------------------------


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def labels_csv(site: Site) -> str:
    return _csv_text(REQUIRED_COLUMNS, ([b.patient_id, b.study_uid, b.laterality, b.pathology, b.birads,
                                         b.density, b.symptomatic, b.split] for b in site.labels))


def images_csv(site: Site) -> str:
    return _csv_text(IMAGE_COLUMNS, ([i.path, i.study_uid, i.laterality, i.view, i.patient_id]
                                     for i in site.images))


def write_sites(out: Path, sites: Sequence[Site]) -> None:
    """Each site's labels.csv and images.csv, both or neither (`common.atomic`)."""
    for site in sites:
        folder = out / site.name
        write_files_atomic({folder / "labels.csv": labels_csv(site), folder / "images.csv": images_csv(site)},
                           durable=False)


def check_folders(src: Path, out: Path, force: bool) -> None:
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder (SRC must be the dataset's folder)")
    src_abs, out_abs = Path(absolute(src)).resolve(), Path(absolute(out)).resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise DatasetError(f"{out}: inside the dataset's folder {src}; nothing is written into a dataset: "
                           "choose OUT elsewhere")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DatasetError(f"{out}: not empty; choose a new or empty folder, or add --force to write the "
                           "site folders into it (their labels.csv and images.csv are replaced)")


# --- the summary -------------------------------------------------------------------------------------

_BIRADS = ("0", "1", "2", "3", "4", "5", "6")


def _tally(title: str, tally: Tally) -> list[str]:
    if not tally.total:
        return [f"{title}: nothing"]
    lines = [f"{title}: {tally.total}"]
    for reason, n in tally.counts.most_common():
        lines.append(f"  {n} × {reason} — e.g. {'; '.join(tally.examples[reason])}")
    return lines


def _row(name: str, labels: Sequence[Breast], images: int) -> str:
    splits = Counter(b.split for b in labels)
    pathology = Counter(b.pathology for b in labels)
    birads = Counter(b.birads[:1] or "none" for b in labels)
    density = Counter(b.density or "none" for b in labels)
    return (f"| {name} | {len({b.patient_id for b in labels})} | {len(labels)} | {images} "
            f"| {splits['train']} | {splits['val']} | {splits['test']} | {pathology['malignant']} "
            f"| {pathology['benign']} | {pathology['']} "
            f"| {'/'.join(str(birads[k]) for k in (*_BIRADS, 'none'))} "
            f"| {'/'.join(str(density[k]) for k in ('a', 'b', 'c', 'd', 'none'))} |")


def summary(imported: Imported, sites: Sequence[Site], out: Path, seconds: float) -> str:
    """The import as text: a table per site (and all sites), what was skipped and changed, and why."""
    lines = [f"Imported {imported.name} into {out} in {seconds:.1f} s"
             + (f" (sites by {imported.site_label})" if imported.site_label else ""),
             "",
             "| site | patients | exams | images | train | val | test | malignant | benign | no pathology "
             "| BI-RADS 0/1/2/3/4/5/6/none | density a/b/c/d/none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(site.name, site.labels, len(site.images)) for site in sites]
    if len(sites) > 1:
        lines.append(_row("all", [b for s in sites for b in s.labels], sum(len(s.images) for s in sites)))
    lines += ["", *_tally("Skipped", imported.skipped), *_tally("Changed", imported.changed)]
    lines += [f"note: {note}" for note in imported.notes]
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------


def import_dataset(fmt: str, src: Path, out: Path, options: Options, force: bool = False,
                   progress: bool = False) -> tuple[Imported, list[Site]]:
    """Read dataset `fmt` at `src` and write its site folders into `out`; raises DatasetError."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[fmt])
    if options.sites_by not in module.SITES_BY:
        allowed = ", ".join(k for k in module.SITES_BY if k)
        what = f"{fmt} can split sites by {allowed}" if allowed else f"{fmt} is one site (no --sites-by)"
        raise DatasetError(f"--sites-by {options.sites_by}: {what}")
    check_folders(src, out, force)
    fractions(options, module.OFFICIAL_SPLIT, fmt)  # bad settings fail before the dataset is read
    imported = module.read(src, options, progress=progress)
    sites = build(imported, options)
    if not sites:
        raise DatasetError(f"{src}: no exam found (a breast with a label row and CC and MLO images); "
                           f"{imported.skipped.total} item(s) skipped: "
                           + "; ".join(f"{n} × {r}" for r, n in imported.skipped.counts.most_common(5)))
    out.mkdir(parents=True, exist_ok=True)
    write_sites(out, sites)
    return imported, sites


def run(args: argparse.Namespace) -> int:
    """`fedmammo import FORMAT SRC OUT`: exit 0 when site folders were written, 2 when the dataset, the
    folders or the options cannot be used (one message, no traceback)."""
    options = Options(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                      sites_by=args.sites_by or "")
    src, out = Path(args.src), Path(args.out)
    started = time.perf_counter()
    try:
        imported, sites = import_dataset(args.format, src, out, options, force=args.force,
                                         progress=sys.stderr.isatty())
    except DatasetError as exc:
        print(f"fedmammo import: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename or out
        print(f"fedmammo import: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(summary(imported, sites, out, time.perf_counter() - started))
    print(f"\n{len(sites)} site folder(s) written: "
          + ", ".join(str(out / site.name) for site in sites)
          + "\nCheck each with `fedmammo check SITE` before it joins a federation.")
    return 0
