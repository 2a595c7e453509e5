"""``fedmammo stats CASES.csv --truth COLUMN [--rater COLUMN ...] [--subgroup COLUMN ...]
[--threshold COLUMN=VALUE ...] [--compare A:B ...] --json OUT.json [--report DIR]``

Reads a reader-study table (one row per case), runs the study's analysis, and writes the JSON (and with
``--report``, Markdown/CSV tables and ROC figures). Bad input stops with one message naming the column
and file line, exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from common.atomic import write_files_atomic
from common.stats._validation import StatsInputError, check_class_counts
from common.stats.analysis import analyze, subgroup_labels
from common.stats.report import report_files, to_json
from common.stats.scores import (
    RaterScores,
    ScoreKind,
    default_threshold,
    looks_like_score,
    parse_scores,
    parse_threshold,
)

_TRUTH = {"0": False, "benign": False, "1": True, "malignant": True}


class CaseTable:
    """A CSV read as text columns, remembering each row's file line for error messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if not header:
                    raise StatsInputError(f"{path}: empty file, expected a header row")
                header = [h.strip() for h in header]
                duplicates = sorted({h for h in header if header.count(h) > 1})
                if duplicates:
                    raise StatsInputError(f"{path}: duplicate column names {duplicates}")
                rows, self.lines = [], []
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue  # blank line
                    if len(row) != len(header):
                        raise StatsInputError(f"{path}, line {reader.line_num}: {len(row)} fields, "
                                              f"the header has {len(header)}")
                    rows.append(row)
                    self.lines.append(reader.line_num)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise StatsInputError(f"cannot read {path}: {e}") from None
        if not rows:
            raise StatsInputError(f"{path}: no data rows")
        self.columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}

    def column(self, name: str, role: str) -> list[str]:
        if name not in self.columns:
            raise StatsInputError(f"{role} column {name!r} not found in {self.path}; "
                                  f"columns are: {', '.join(self.columns)}")
        return self.columns[name]


def _truth(table: CaseTable, column: str) -> np.ndarray:
    values = []
    for text, line in zip(table.column(column, "truth"), table.lines, strict=True):
        key = text.strip().lower()
        if key not in _TRUTH:
            raise StatsInputError(f"column {column!r}, line {line}: truth {text!r} is not "
                                  "0/1 or benign/malignant")
        values.append(_TRUTH[key])
    truth = np.array(values)
    check_class_counts(truth, 1, name=f"truth column {column!r}", why="the analysis")
    return truth


def _rater_names(table: CaseTable, args: argparse.Namespace, subgroups: list[str]) -> list[str]:
    if args.rater:
        for name in args.rater:
            table.column(name, "rater")
        return list(dict.fromkeys(args.rater))
    # Without --rater every other column whose entries are numbers or BI-RADS categories is a rater;
    # blanks and NaN do not disqualify a column here, so they get reported rather than silently skipped.
    names = [name for name, texts in table.columns.items()
             if name != args.truth and name not in subgroups and any(t.strip() for t in texts)
             and all(looks_like_score(t) for t in texts if t.strip())]
    if not names:
        raise StatsInputError(f"no rater columns found in {table.path}; name them with --rater")
    return names


def _thresholds(args: argparse.Namespace, kinds: dict[str, ScoreKind]) -> dict[str, float]:
    given = {}
    for spec in args.threshold or []:
        column, sep, value = spec.rpartition("=")
        if not sep or not column:
            raise StatsInputError(f"--threshold {spec!r}: expected COLUMN=VALUE")
        if column not in kinds:
            raise StatsInputError(f"--threshold {spec!r}: {column!r} is not a rater column "
                                  f"(raters: {', '.join(kinds)})")
        given[column] = parse_threshold(value, kinds[column], column)
    thresholds = {}
    for name, kind in kinds.items():
        threshold = given.get(name, default_threshold(kind))
        if threshold is None:
            raise StatsInputError(f"rater column {name!r}: scores outside 0–100 have no default threshold; "
                                  f"pass --threshold {name}=VALUE")
        thresholds[name] = threshold
    return thresholds


def _pairs(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str]] | None:
    if not args.compare:
        return None
    pairs = []
    for spec in args.compare:
        parts = spec.split(":")
        if len(parts) != 2 or parts[0] == parts[1]:
            raise StatsInputError(f"--compare {spec!r}: expected A:B with two different rater columns")
        for part in parts:
            if part not in names:
                raise StatsInputError(f"--compare {spec!r}: {part!r} is not a rater column "
                                      f"(raters: {', '.join(names)})")
        pairs.append((parts[0], parts[1]))
    return pairs


def _outputs(args: argparse.Namespace) -> dict[Path, bytes]:
    """Everything to write, computed in full before any of it is written."""
    table = CaseTable(args.cases)
    truth = _truth(table, args.truth)
    subgroup_columns = list(dict.fromkeys(args.subgroup or []))
    if args.truth in subgroup_columns:
        raise StatsInputError(f"--subgroup {args.truth!r} is the truth column")
    subgroups = {c: subgroup_labels(c, table.column(c, "subgroup")) for c in subgroup_columns}
    names = _rater_names(table, args, subgroup_columns)
    if args.truth in names:
        raise StatsInputError(f"--rater {args.truth!r} is the truth column")
    parsed = {name: parse_scores(table.column(name, "rater"), name, table.lines) for name in names}
    thresholds = _thresholds(args, {name: kind for name, (_, kind) in parsed.items()})
    raters = {name: RaterScores(scores, kind, thresholds[name]) for name, (scores, kind) in parsed.items()}
    result = analyze(truth, raters, _pairs(args, names), subgroups)
    outputs = {Path(args.json): to_json(result).encode()}
    if args.report:
        files = report_files(result, truth, raters, subgroups)
        outputs.update({Path(args.report) / name: data for name, data in files.items()})
    return outputs


def run(args: argparse.Namespace) -> int:
    """``fedmammo stats``: exit 0 on success, 2 on bad input (nothing written), 1 if writing fails."""
    try:
        outputs = _outputs(args)
    except StatsInputError as e:
        print(f"fedmammo stats: error: {e}", file=sys.stderr)
        return 2
    try:
        write_files_atomic(outputs)
    except OSError as e:
        print(f"fedmammo stats: error: cannot write outputs: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.json}" + (f" and the report in {args.report}" if args.report else ""))
    return 0
