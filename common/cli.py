"""The `fedmammo` command: one parser, each subcommand's work in the module that owns it.

Handlers are imported only when their subcommand runs, so `fedmammo stats` or `--help` does not pay for
importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"

HANDLERS = {
    "synth": "common.synth.command:run",
    "import": "common.datasets.importer:run",
    "check": "client.check:run",
    "train": "client.train:run",
    "predict": "client.predict:run",
    "stats": "common.stats.command:run",
    "demo": "server.launch:demo",
    "federate": "server.launch:run",
    "certs": "server.certs:run",
    "superexec": "client.superexec:run",
    "node": "client.node:run",
    "site-key": "server.certs:run_site_key",
}


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmammo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a realistic synthetic multi-site DICOM cohort")
    p.add_argument("out", help="output folder; one subfolder per site")
    p.add_argument("--config", help="TOML file whose [synth] section gives the defaults")
    p.add_argument("--sites", type=int, help="number of sites (default 3)")
    p.add_argument("--train", type=_counts, help="training exams per site, e.g. 380,40,40")
    p.add_argument("--val", type=_counts, help="validation exams per site (default 15%% of train, >= 4)")
    p.add_argument("--test", type=_counts, help="test exams per site")
    p.add_argument("--seed", type=int, help="random seed; the same seed writes the same files")
    p.add_argument("--scale", type=float, help="matrix size relative to the real detector (default 0.125)")
    p.add_argument("--reader", action="append", metavar="NAME=SENS/SPEC",
                   help="simulated reader with its sensitivity and specificity (repeatable; "
                        "default: the study's two senior and two junior radiologists)")

    p = sub.add_parser("import", help="make site folders from a public dataset, read where it lies "
                                      "(RSNA, VinDr-Mammo, CBIS-DDSM, CMMD; docs/datasets.md)")
    p.add_argument("format", metavar="FORMAT", choices=["rsna", "vindr", "cbis-ddsm", "cmmd"],
                   help="the dataset's format: rsna, vindr, cbis-ddsm or cmmd")
    p.add_argument("src", metavar="SRC", help="the dataset's folder, as published (never written to)")
    p.add_argument("out", metavar="OUT", help="new or empty folder for the site folders (labels.csv + "
                                              "images.csv each)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the patient-level splits (default 0)")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="share of patients in val (default 0.1 where the dataset has no split, else 0: "
                        "taken from its train)")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help="share of patients in test where the dataset has no split (default 0.2)")
    p.add_argument("--sites-by", metavar="KEY",
                   help="rsna: site_id (default) or machine_id; vindr, cmmd: manufacturer (default: one "
                        "site)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")

    p = sub.add_parser("check", help="inventory a site folder before it joins a federation")
    p.add_argument("dir", help="site folder: DICOM files (any depth) and labels.csv")
    p.add_argument("--config", help="TOML config ([data] section)")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--views", metavar="OUT",
                   help="also write what the model sees: each usable exam's model input, one 8-bit PNG per "
                        "view at the configured size, OUT/<exam_id>_<VIEW>.png (VIEW: CC, MLO, CONTRA_CC, "
                        "CONTRA_MLO); characters of the exam id other than letters, digits, '.', '-', '_' "
                        "become '_'")

    p = sub.add_parser("train", help="train the model locally on one or more site folders")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="site folder(s); several are pooled")
    p.add_argument("--config", help="TOML config ([data], [model], [train])")
    p.add_argument("--out", default="runs/local", help="output folder (default runs/local)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")

    p = sub.add_parser("predict", help="score new studies, or a site's exams, with trained weights")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a site folder, any folder of DICOM files (no labels needed), or DICOM files")
    p.add_argument("--weights", required=True, help="safetensors checkpoint")
    p.add_argument("--config", help="TOML config; must match the one the weights were trained with")
    p.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="a labelled site's split to score (default: test; without labels.csv: all)")
    p.add_argument("--json", help="write per-exam predictions as JSON here")
    p.add_argument("--csv", help="write per-exam predictions as CSV here")
    p.add_argument("--heatmaps", metavar="DIR",
                   help="also show where the model looks: per view, DIR/<exam_id>_<VIEW>.png, the view as "
                        "displayed with its Grad-CAM heatmap and the box of its most salient region; the "
                        "JSON gets each view's box and peak in its DICOM file's pixels")

    p = sub.add_parser("stats", help="reader-study statistics of a case table (AUC, DeLong, subgroups)")
    p.add_argument("cases", help="CSV with one row per case")
    p.add_argument("--truth", required=True, help="truth column (0/1 or benign/malignant)")
    p.add_argument("--rater", action="append", help="rater column (repeatable; default: all numeric)")
    p.add_argument("--subgroup", action="append", help="column that splits every table (repeatable)")
    p.add_argument("--threshold", action="append", metavar="COLUMN=VALUE", help="positive at score >= VALUE")
    p.add_argument("--compare", action="append", metavar="A:B", help="pair to compare (default: all)")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--report", help="folder for Markdown/CSV tables and the ROC figure")

    p = sub.add_parser("demo", help="synthetic 3-site cohort → federated training in simulation → report")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="TOML config (default configs/demo.toml)")
    p.add_argument("--rounds", type=int, help="federated rounds (default: [train] epochs)")
    p.add_argument("--baselines", action="store_true", help="also train each site's local-only model")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is abandoned")
    p.add_argument("--run-config", dest="run_config", action="append", metavar="KEY=VALUE",
                   help="override a run-config value of the demo (repeatable), e.g. local-epochs=1")

    p = sub.add_parser("federate", help="run the federation: simulation over site folders, or a deployment")
    p.add_argument("data_root", nargs="?", help="simulation: folder holding one folder per site")
    p.add_argument("--connection", help="deployment: a connection named in FLWR_HOME's config.toml")
    p.add_argument("--config", help="TOML config ([data], [model], [train])")
    p.add_argument("--out", default="runs/federated", help="the center's output folder")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--resume", action="store_true", help="continue from the last complete round in --out")
    p.add_argument("--run-config", dest="run_config", action="append", metavar="KEY=VALUE",
                   help="override a [tool.flwr.app.config] value (repeatable)")
    p.add_argument("--timeout", type=float, default=86400.0, help="seconds before the run is abandoned")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="simulation on this Ray cluster's head (default: $RAY_ADDRESS; unset or 'local': "
                        "a Ray instance of the simulation's own); docs/cluster.md")
    p.add_argument("--cpus-per-site", type=int, metavar="N",
                   help="simulation: CPUs Ray reserves for each virtual site (default 1)")
    p.add_argument("--gpus-per-site", type=float, metavar="F",
                   help="simulation: GPUs Ray reserves for each virtual site, a fraction shares one "
                        "(0.5: two sites per GPU; default 0, no GPU)")

    p = sub.add_parser("superexec", help="a hospital's SuperExec: ClientApps start with PyTorch imported "
                                         "(beside `flower-supernode --isolation process`)")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's --runtime-api-address")
    p.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate (default: plain, "
                                               "for a Runtime API on 127.0.0.1)")
    p.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) exits")

    p = sub.add_parser("node", help="a hospital's SuperNode and warm SuperExec, supervised as one service")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the center's address")
    p.add_argument("--ca", metavar="FILE", help="the center's ca.crt (default: the system's CAs)")
    p.add_argument("--key", metavar="FILE", help="the site's private key from `fedmammo site-key` (where the "
                                                 "center authenticates SuperNodes)")
    p.add_argument("--data", required=True, metavar="DIR", help="the site folder (DICOM files, labels.csv)")
    p.add_argument("--out", required=True, metavar="DIR", help="the site's own output folder")
    p.add_argument("--name", metavar="SITE", help="the site's name in reports (default: the data folder's)")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only; no --ca/--key)")
    p.add_argument("--runtime-port", type=int, metavar="PORT",
                   help="the SuperNode's local Runtime API port on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-warm", action="store_true", help="Flower's own ClientApp processes instead of "
                                                          "`fedmammo superexec` (slower; for comparisons)")
    p.add_argument("--log", metavar="FILE", help="also append every line here, timestamped")
    p.add_argument("--systemd", action="store_true", help="print a systemd unit running this command; exit")
    p.add_argument("--user", default="fedmammo", help="--systemd: the service's user (default fedmammo)")

    p = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate")
    p.add_argument("out", help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--host", action="append", help="host name or IP the SuperLink is reached at (repeatable)")
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    p = sub.add_parser("site-key", help="make a hospital's SuperNode key pair (SuperNode authentication)")
    p.add_argument("out", help="folder for NAME.key (stays at the hospital) and NAME.pub (to the center)")
    p.add_argument("name", help="the site's name, as the center registers it")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, func = HANDLERS[args.command].partition(":")
    handler = getattr(importlib.import_module(module), func)
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
