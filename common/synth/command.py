"""`fedmammo synth OUT`: write the synthetic multi-site cohort.

Settings: command-line values override the config file's [synth] section, which overrides
`common.config.SynthConfig`'s defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common.config import SynthConfig, load_config
from common.synth.cohort import default_val
from common.synth.generate import CohortSpec, generate
from common.synth.readers import DEFAULT_READERS, parse_reader


def _setting(args: argparse.Namespace, synth: SynthConfig, name: str) -> tuple[object, str]:
    """A setting's value and where it came from: the command line, else the config file, else the default."""
    given = getattr(args, name)
    if given is not None:
        return given, f"--{name}"
    return getattr(synth, name), f"[synth] {name} of {args.config or 'the defaults'}"


def _whole(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be a whole number >= {minimum}; got {value!r}")
    return value


def _spec(args: argparse.Namespace) -> CohortSpec:
    synth = load_config(args.config).synth
    sites = _whole(*_setting(args, synth, "sites"), minimum=1)
    counts = {}
    for name in ("train", "val", "test"):
        values, where = _setting(args, synth, name)
        if values is None:  # val: derived from train
            continue
        if not isinstance(values, list | tuple) or len(values) != sites:
            count = len(values) if isinstance(values, list | tuple) else 1
            raise ValueError(f"{where} has {count} value(s) but there are {sites} sites: give one per site")
        counts[name] = tuple(_whole(v, where, minimum=0) for v in values)
    counts.setdefault("val", tuple(default_val(n) for n in counts["train"]))
    scale, where = _setting(args, synth, "scale")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ValueError(f"{where} must be a number; got {scale!r}")
    readers = tuple(parse_reader(text) for text in args.reader) if args.reader else DEFAULT_READERS
    return CohortSpec(**counts, seed=_whole(*_setting(args, synth, "seed"), minimum=0), scale=float(scale),
                      readers=readers, conspicuity=float(synth.conspicuity))


def _prepare(out: Path) -> None:
    """OUT must be new, empty, or a previous cohort (which is replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    previous = out / "cohort.json"
    if not previous.is_file():
        raise ValueError(f"{out}: folder is not empty and holds no cohort.json; choose a new or empty folder")
    try:
        names = [site["name"] for site in json.loads(previous.read_text())["sites"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{previous}: unreadable ({exc}); delete {out} by hand") from None
    for name in names:
        if name and "/" not in name and name not in (".", "..") and (out / name).is_dir():
            shutil.rmtree(out / name)
    previous.unlink()  # last: if a removal fails, the next run still knows what to replace


def _ideal(result: dict | None) -> str:
    """An ideal-observer entry of cohort.json as `0.932 [0.877, 0.988]`; `n/a` for a split lacking a class."""
    if result is None:
        return "n/a"
    ci = result["auc_ci"]
    return f"{result['auc']:.3f}" + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    start = time.perf_counter()
    try:
        spec = _spec(args)
        _prepare(out)
        summary = generate(spec, out, progress=sys.stderr.isatty())
    except ValueError as exc:  # settings or OUT the user must fix (raised before anything is written)
        print(f"fedmammo synth: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedmammo synth: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print("| site | vendor | matrix | transfer syntax | train | val | test | malignant | dense "
          "| ideal observer, test AUC [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for site in summary["sites"]:
        exams, malignant, density = site["exams"], site["malignant"], site["density"]
        total = sum(exams.values())
        print(f"| {site['name']} | {site['profile']['manufacturer']} {site['profile']['model']} "
              f"| {site['matrix'][0]}×{site['matrix'][1]} | {site['profile']['transfer_syntax']} "
              f"| {exams['train']} | {exams['val']} | {exams['test']} | {sum(malignant.values())}/{total} "
              f"| {density['c'] + density['d']}/{total} | {_ideal(site['ideal_observer']['test'])} |")
    studies = sum(sum(site["exams"].values()) for site in summary["sites"])
    print(f"\n{studies} studies ({4 * studies} images) written to {out} in {seconds:.1f} s")
    ceiling = _ideal(summary["total"]["ideal_observer"]["test"])
    print(f"Ideal observer (the lesion appearance latent, which carries the label: no model beats it on "
          f"these exams): test AUC {ceiling} over all sites, {summary['ideal_observer_auc']:.3f} expected")
    return 0
