"""The study-like comparison: a federated model against each site's local-only model and against a model
trained centrally on the pooled data, on each site's own test set. Prints Markdown tables.

    .venv/bin/python bench/bench_study.py [--config configs/study.toml] [--out /tmp/fedmammo-study]

- federated: `fedmammo federate`'s simulation (FedAvg, one local epoch a round, `[train] epochs` rounds)
  with `baselines=true`, so each site also trains its local-only model for as many epochs; the p-values
  of the global model vs the local-only ones are the report's (federated DeLong, exact);
- central: the same trainer (`client.train.train_epochs`) on the three sites' training exams pooled, for
  the same number of epochs from the same initial model, run beside the federation;
- federated vs central: DeLong on each site's test set and on all of them, from the sites' prediction
  files (a researcher holding all the data may do this; in a real federation the central arm does not
  exist).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from client.data import exam_set  # noqa: E402
from client.evaluate import predict  # noqa: E402
from client.prepare import prepare_site  # noqa: E402
from client.train import train_epochs  # noqa: E402
from common.cli import main as fedmammo  # noqa: E402
from common.config import load_config  # noqa: E402
from common.model import initial_model  # noqa: E402
from common.protocol import LOCAL_ONLY, MODEL  # noqa: E402
from common.runtime import set_threads  # noqa: E402
from common.sites import site_folders  # noqa: E402
from common.stats import auc_ci, delong_test  # noqa: E402
from server.evaluation import SITE_GROUP  # noqa: E402
from server.launch import simulate  # noqa: E402
from server.settings import BATCHNORM, SITE_WEIGHTING  # noqa: E402


def _central(sites: list[Path], config_path: Path, out: dict) -> None:
    config = load_config(config_path)
    set_threads(config.train.num_threads)
    started = time.perf_counter()
    prepared = [prepare_site(site, config, progress=False) for site in sites]
    model = initial_model(config)
    train_epochs(model, exam_set(prepared, "train"), config, epochs=config.train.epochs, progress=False)
    out["seconds"] = time.perf_counter() - started
    out["scores"] = {}
    for site in prepared:
        predictions = predict(model, exam_set([site], "test"), config)
        # the prediction files' grid (one decimal), so that the comparison uses the same resolution
        out["scores"] |= dict(zip(predictions.exam_ids, np.round(predictions.score, 1), strict=True))


def _site_predictions(federated: Path) -> dict[str, list[dict[str, str]]]:
    """Each site's final prediction file (its own output folder, as a hospital would keep it)."""
    files = {}
    for site in sorted((federated / "sites").iterdir()):
        path = sorted(site.glob("runs/*/predictions/round-*.csv"))[-1]
        with path.open() as f:
            files[site.name] = list(csv.DictReader(f))
    return files


def _p(table: dict) -> float | None:
    """The report's DeLong p-value of the global model vs the local-only models in one of its tables."""
    return next((c["p"] for c in table["comparisons"] if {c["a"], c["b"]} == {MODEL, LOCAL_ONLY}), None)


def _auc(truth: np.ndarray, scores: np.ndarray) -> str:
    auc, low, high = auc_ci(truth, scores)
    return f"{auc:.3f} ({low:.3f}–{high:.3f})"


def study_inputs(config: str, out: Path, train: str = "") -> tuple[Path, Path]:
    """`out`/data, the study-like cohort of `config` (written the first time), and `out`/study.toml, `config`
    with one decoded-view cache for every run in `out` and the lines `train` added to its [train]."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "cohort.json").is_file():
        fedmammo(["synth", str(data), "--config", config])
    config_path = out / "study.toml"
    text = Path(config).read_text().replace("[data]\n", f'[data]\ncache_dir = "{out / "cache"}"\n')
    config_path.write_text(text.replace("[train]\n", f"[train]\n{train}"))
    return data, config_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "study.toml"))
    parser.add_argument("--out", default="/tmp/fedmammo-study")
    parser.add_argument("--batchnorm", default="local", choices=BATCHNORM,
                        help="BatchNorm kept at each site (FedBN, the default), or averaged")
    parser.add_argument("--site-weighting", default="equal", choices=SITE_WEIGHTING,
                        help="sites weighted equally (the default: run 8 in bench/RESULTS.md), or by exams")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    # one torch thread per process: the federation's three sites and the central arm share the machine's cores
    data, config_path = study_inputs(args.config, out, train="num_threads = 1\n")
    config = load_config(config_path)
    sites = site_folders(data)
    prepared = [prepare_site(site, config, progress=False) for site in sites]  # decode once, for both arms
    sizes = "/".join(str(len(exam_set([p], "train"))) for p in prepared)

    central: dict = {}
    worker = threading.Thread(target=_central, args=(sites, config_path, central))
    federated = out / "federated" / time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    worker.start()
    outcome = simulate(data, {"config": str(config_path), "num-server-rounds": config.train.epochs,
                              "local-epochs": 1, "baselines": True, "batchnorm": args.batchnorm,
                              "site-weighting": args.site_weighting,
                              "round-timeout": 4 * 3600.0, "out-dir": str(federated)},
                       home=out / "flower", timeout_s=6 * 3600, echo=print)
    federated_s = time.perf_counter() - started
    worker.join()
    if not outcome.ok:
        sys.exit(f"federated run failed: {outcome.status} {outcome.details}")
    report = json.loads((federated / "report" / "report.json").read_text())

    rows = _site_predictions(federated)
    height, width = config.data.image_size
    print(f"\n### Study-like setting: {len(sites)} sites, train {sizes} exams, {height}×{width} views, "
          f"{config.train.epochs} epochs (federated: {config.train.epochs} rounds × 1 local epoch, BatchNorm "
          f"{args.batchnorm}, sites weighted by {args.site_weighting})\n")
    print("| test set | n (malignant) | federated AUC (95% CI) | local-only AUC | p fed vs local-only "
          "| central AUC | p fed vs central | fed − central |")
    print("|---|---|---|---|---|---|---|---|")
    pooled: dict[str, list[float]] = {"truth": [], MODEL: [], LOCAL_ONLY: [], "central": []}
    for name, cases in [*rows.items(), ("all sites", None)]:
        if cases is None:
            truth = np.asarray(pooled["truth"])
            fed, local, cen = (np.asarray(pooled[k]) for k in (MODEL, LOCAL_ONLY, "central"))
            p_local = _p(report["evaluation"])
        else:
            truth = np.asarray([int(c["malignant"]) for c in cases])
            fed = np.asarray([float(c[MODEL]) for c in cases])
            local = np.asarray([float(c[LOCAL_ONLY]) for c in cases])
            cen = np.asarray([central["scores"][c["exam_id"]] for c in cases])
            for key, values in (("truth", truth), (MODEL, fed), (LOCAL_ONLY, local), ("central", cen)):
                pooled[key] += list(values)
            p_local = _p(report["evaluation"]["subgroups"][SITE_GROUP.format(name)])
        p_central = delong_test(truth, fed, cen)[1]
        gap = auc_ci(truth, fed)[0] - auc_ci(truth, cen)[0]
        p_text = "n/e" if p_local is None else f"{p_local:.3g}"
        print(f"| {name} | {len(truth)} ({int(truth.sum())}) | {_auc(truth, fed)} | {_auc(truth, local)} "
              f"| {p_text} | {_auc(truth, cen)} | {p_central:.3g} | {gap:+.3f} |")
    print(f"\nwall: federated run with baselines {federated_s:.0f} s, central training "
          f"{central['seconds']:.0f} s (in parallel); report {federated / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
