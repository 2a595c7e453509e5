"""Half-precision transfer (run config `transfer-dtype`) on the study-like setting: the federated model's
AUC with the weights sent as float32, bfloat16 or float16, and the bytes a site sends and receives per
round. Prints a Markdown table.

    .venv/bin/python bench/bench_transfer.py [--rounds 5] [--dtypes float32,bfloat16,float16]

The federated arm of `bench/bench_study.py` only (FedBN, sites weighted equally, one local epoch a round;
no local-only baselines, no central arm), the same cohort and config, `--rounds` rounds (the study bench
runs `[train] epochs` = 15), one run per type from the same initial model and seeds. AUCs are the
report's: per site and pooled exactly from the sites' histograms, 95% DeLong CIs; p vs float32: paired
DeLong test of the pooled AUC against the float32 run's (this invocation's, else the latest in `--out`),
on the same test exams, from the sites' prediction files. Bytes are the weights'
Array as Flower sends it (its serialised data: a numpy header for float32, the raw values for half types),
down (global weights) and up (a site's weights, or its update in half precision).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_study import study_inputs  # noqa: E402

from common.config import load_config  # noqa: E402
from common.model import initial_model  # noqa: E402
from common.protocol import MODEL, WEIGHTS, pack_weights  # noqa: E402
from common.stats import delong_test  # noqa: E402
from server.evaluation import SITE_GROUP  # noqa: E402
from server.launch import simulate  # noqa: E402
from server.settings import TRANSFER_DTYPES  # noqa: E402
from server.state import exchanged_keys  # noqa: E402


def _scores(run: Path) -> dict[str, tuple[int, float]]:
    """The final model's score of every test exam of every site (the sites' own prediction files)."""
    scores = {}
    for path in run.glob("sites/*/runs/*/predictions/round-*.csv"):
        if path == max(path.parent.glob("round-*.csv")):
            with path.open() as f:
                scores |= {r["exam_id"]: (int(r["malignant"]), float(r[MODEL])) for r in csv.DictReader(f)}
    return scores


def _versus(scores: dict[str, tuple[int, float]], reference: dict[str, tuple[int, float]]) -> str:
    """Paired DeLong p of a run's pooled AUC against the float32 run's, on the same test exams."""
    exams = sorted(scores)
    if not reference or sorted(reference) != exams:
        return "–"
    truth = [scores[e][0] for e in exams]
    return f"{delong_test(truth, [scores[e][1] for e in exams], [reference[e][1] for e in exams])[1]:.2f}"


def _auc(table: dict) -> str:
    model = table["raters"][MODEL]
    low, high = model["auc_ci"]
    return f"{model['auc']:.3f} ({low:.3f}–{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "study.toml"))
    parser.add_argument("--out", default="/tmp/fedmammo-transfer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default=",".join(TRANSFER_DTYPES))
    args = parser.parse_args()
    data, config_path = study_inputs(args.config, Path(args.out).resolve())
    out = config_path.parent
    model = initial_model(load_config(config_path))
    keys = exchanged_keys(model, "local")
    rows = []
    # the float32 run to compare with: this invocation's, else the latest one in `out`
    earlier = sorted((out / "federated").glob("float32-*/report/report.json"))
    reference = _scores(earlier[-1].parents[1]) if earlier else {}
    for dtype in args.dtypes.split(","):
        run = out / "federated" / f"{dtype}-{time.strftime('%Y%m%d-%H%M%S')}"
        started = time.perf_counter()
        outcome = simulate(data, {"config": str(config_path), "num-server-rounds": args.rounds,
                                  "local-epochs": 1, "batchnorm": "local", "site-weighting": "equal",
                                  "eval-every": 0, "transfer-dtype": dtype, "round-timeout": 4 * 3600.0,
                                  "out-dir": str(run)},
                           home=out / "flower", timeout_s=6 * 3600, echo=print,
                           federation_config={"init-args-num-cpus": 3})
        if not outcome.ok:
            sys.exit(f"{dtype}: run failed: {outcome.status} {outcome.details}")
        evaluation = json.loads((run / "report" / "report.json").read_text())["evaluation"]
        sites = [g.removeprefix(SITE_GROUP.format("")) for g in evaluation["subgroups"]
                 if g.startswith(SITE_GROUP.format(""))]
        payload = len(pack_weights(model.state_dict(), keys, dtype)[WEIGHTS].data)
        if dtype == "float32":
            reference = _scores(run)
        versus = "–" if dtype == "float32" else _versus(_scores(run), reference)
        rows.append((dtype, _auc(evaluation), versus,
                     [_auc(evaluation["subgroups"][SITE_GROUP.format(s)]) for s in sites], payload,
                     time.perf_counter() - started))
    print(f"\n### Transfer precision on the study-like setting ({args.rounds} rounds, FedBN, sites weighted "
          f"equally; {len(keys)} exchanged tensors)\n")
    print(f"| transfer | pooled AUC (95% CI) | p vs float32 | {' | '.join(sites)} "
          "| MiB per site per round, down / up | run wall (s) |")
    print("|---|---|---|" + "---|" * len(sites) + "---|---|")
    for dtype, pooled, versus, per_site, payload, wall in rows:
        mib = payload / 2**20  # the update back has the weights' size
        print(f"| {dtype} | {pooled} | {versus} | {' | '.join(per_site)} | {mib:.2f} / {mib:.2f} "
              f"| {wall:.0f} |")


if __name__ == "__main__":
    main()
