"""The ServerApp: the coordinating center's side of a federated run (Flower's Message API).

Each round the strategy samples sites and sends them the global weights; their trained weights are
aggregated, weighted by their training exams, in a fixed order (by site name) so that a run repeats
exactly. The new global weights, the round, the strategy's own state (server momentum, Adam moments) and
the metrics so far then go to a checkpoint, atomically; `resume` continues from the last complete round
and ends as an uninterrupted run would. A round in which no site replied, or every site failed, stops the
run with an error: unchanged weights are never checkpointed as if a round had trained.

Every `eval-every` rounds, and at the end, the federated evaluation (`server.evaluation`) scores the
global model at every site; the final one adds the paired tests and writes the report (`server.report`).
Settings come from the run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from torch import nn

from client.app import WEIGHTS, pack_weights, unpack_weights
from client.clipping import CENTRAL_DP, SITE_WEIGHT
from client.site_stats import ALL, MODEL, SITE, site_name, to_json
from common.atomic import write_atomic
from common.checkpoint import latest_checkpoint, load_checkpoint, mark_latest, model_metadata, save_checkpoint
from common.config import Config, config_dict, parse_config
from common.model import initial_model
from common.preprocess import VERSION as INPUTS_VERSION
from common.runtime import set_threads
from common.sites import absolute_path
from server.attendance import Attendance
from server.console import APP_DIR, MARKER
from server.evaluation import (
    SITE_GROUP,
    common_raters,
    decode,
    estimable,
    federated_analysis,
    not_estimable,
    pool_groups,
)
from server.privacy import Ledger, privacy_report, settings_problems, wrap
from server.report import write_report
from server.sanity import screen_updates
from server.secagg import secure_round
from server.secagg import settings_problems as secagg_problems

app = ServerApp()

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": lambda s, c, nodes: FedAvg(**nodes),
    "fedprox": lambda s, c, nodes: FedProx(**nodes, proximal_mu=s.proximal_mu),
    "fedadam": lambda s, c, nodes: FedAdam(**nodes, eta_l=c.train.lr,
                                           **({"eta": s.server_lr} if s.server_lr else {})),
    "fedavgm": lambda s, c, nodes: FedAvgM(**nodes, server_momentum=s.server_momentum,
                                           **({"server_learning_rate": s.server_lr} if s.server_lr else {})),
    "trimmed-mean": lambda s, c, nodes: FedTrimmedAvg(**nodes, beta=s.trim_beta),
    "median": lambda s, c, nodes: FedMedian(**nodes),
    "krum": lambda s, c, nodes: Krum(**nodes, num_malicious_nodes=s.krum_malicious),
}
"""Run-config `strategy` → Flower's strategy; `server-lr` 0 keeps the strategy's own default."""
BATCHNORM = ("average", "local")
"""BatchNorm layers averaged like every weight, or kept at each site (FedBN, Li et al. 2021)."""
SITE_WEIGHTING = ("examples", "equal")
"""Sites weighted in the mean by their training exams (FedAvg), or each the same whatever its size."""
_STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")
"""Strategy attributes carried from round to round (FedAdam's moments, FedAvgM's momentum)."""
_STATE_PREFIX = "strategy::"
_RESUMABLE = {"num-server-rounds", "round-timeout", "node-wait-timeout", "eval-every", "baselines",
              "stats-min-count", "resume"}
"""Run-config keys that may change when a run is resumed: they do not change the trained weights."""
_RUN_CONFIG_KEYS = {"config_path": "config", "rounds": "num-server-rounds", "out": "out-dir"}
"""Settings fields whose run-config key is not the field's name with dashes."""
_CSV_COLUMNS = ("round", "phase", "site", "n", "loss", "auc", "auc_low", "auc_high", "sensitivity",
                "specificity", "accuracy", "seconds", "missing", "epsilon")


class RoundError(RuntimeError):
    """A round that cannot go on: no site replied, every site failed, or too few sites are connected."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run config, checked (see `[tool.flwr.app.config]` in pyproject.toml for each key)."""

    config_path: Path
    rounds: int
    local_epochs: int
    local_steps: int
    strategy: str
    proximal_mu: float
    server_lr: float
    server_momentum: float
    trim_beta: float
    krum_malicious: int
    batchnorm: str
    site_weighting: str
    min_nodes: int
    fraction_train: float
    round_timeout: float
    node_wait_timeout: float
    eval_every: int
    baselines: bool
    stats_min_count: int
    out: Path
    resume: bool
    max_update_norm: float
    update_norm_factor: float
    secagg: bool
    secagg_clipping_range: float
    secagg_max_weight: float
    central_dp: str
    dp_noise_multiplier: float
    dp_clipping_norm: float
    dp_sampled_sites: int
    dp_delta: float
    dp_clipped_count_stddev: float

    @classmethod
    def from_run_config(cls, run: Mapping[str, Any]) -> Settings:
        """Read and check every key; a wrong type or value is an error naming the key."""
        values = {}
        for field in dataclasses.fields(cls):
            key = _RUN_CONFIG_KEYS.get(field.name, field.name.replace("_", "-"))
            kind = {"Path": str, "int": int, "float": float, "str": str, "bool": bool}[str(field.type)]
            value = run.get(key)
            try:
                if value is None or (kind is bool) != isinstance(value, bool):
                    raise ValueError
                values[field.name] = kind(value)
            except ValueError:
                raise ValueError(f"run config {key} = {value!r}: expected a {kind.__name__}") from None
        config = Path(values["config_path"])
        values["config_path"] = config if config.is_absolute() else APP_DIR / config
        values["out"] = absolute_path(run, "out-dir", "run config")
        s = cls(**values)
        problems = [message for failed, message in (
            (s.strategy not in STRATEGIES, f"strategy {s.strategy!r} is not one of {', '.join(STRATEGIES)}"),
            (s.batchnorm not in BATCHNORM, f"batchnorm {s.batchnorm!r} is not one of {', '.join(BATCHNORM)}"),
            (s.site_weighting not in SITE_WEIGHTING,
             f"site-weighting {s.site_weighting!r} is not one of {', '.join(SITE_WEIGHTING)}"),
            (s.rounds < 1, "num-server-rounds must be at least 1"),
            (s.local_epochs < 1 and s.local_steps < 1, "local-epochs or local-steps must be at least 1"),
            (s.min_nodes < 1, "min-nodes must be at least 1"),
            (not s.config_path.is_file(), f"config: {s.config_path} does not exist"),
        ) if failed] + settings_problems(s) + secagg_problems(s)
        if problems:
            raise ValueError("run config: " + "; ".join(problems))
        return s


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds: everything a resumed run needs to continue as if never stopped."""

    arrays: ArrayRecord
    """The global weights as sent (`client.app.pack_weights`)."""
    keys: list[str]
    """The names of the weights the server averages and sends, in their order in `arrays`."""
    template: dict[str, torch.Tensor]
    """The initial model's state: the shapes of `arrays`' parts, and what the server does not average."""
    round: int
    token: str
    """Names this run's folder at each site (its predictions, the state it keeps)."""
    history: list[dict[str, Any]]


def exchanged_keys(model: nn.Module, batchnorm: str) -> list[str]:
    """The state-dict entries the server averages and sends. Never BatchNorm's step counters (integers,
    unused with a momentum); with FedBN no BatchNorm entry at all."""
    local = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            kept = ("num_batches_tracked",) + (("weight", "bias", "running_mean", "running_var")
                                               if batchnorm == "local" else ())
            local |= {f"{name}.{entry}" for entry in kept}
    return [k for k in model.state_dict() if k not in local]


def weighting(settings: Settings) -> str:
    """The train metric the strategy weights sites by: exams, unless the run asks for equal weights or
    uses central DP (whose noise is calibrated to the plain mean of the clipped updates)."""
    equal = settings.site_weighting == "equal" or settings.central_dp != "none"
    return SITE_WEIGHT if equal else "num-examples"


def make_strategy(settings: Settings, config: Config) -> Strategy:
    nodes = {"fraction_train": settings.fraction_train, "min_train_nodes": settings.min_nodes,
             "min_evaluate_nodes": settings.min_nodes, "min_available_nodes": settings.min_nodes,
             "weighted_by_key": weighting(settings)}
    return wrap(STRATEGIES[settings.strategy](settings, config, nodes), settings, config)


def strategy_state(strategy: Strategy, keys: list[str]) -> dict[str, torch.Tensor]:
    """The strategy's round-to-round state as named tensors (`keys`: its ArrayRecord's names, in order)."""
    tensors = {}
    strategy = getattr(strategy, "strategy", strategy)  # inside a DP wrapper (`server.privacy`)
    for attr in _STRATEGY_STATE:
        value = getattr(strategy, attr, None)
        if value is not None:
            items = value.items() if isinstance(value, dict) else zip(keys, value, strict=True)
            tensors |= {f"{_STATE_PREFIX}{attr}::{k}": torch.tensor(np.asarray(v)) for k, v in items}
    return tensors


def restore_strategy_state(strategy: Strategy, tensors: Mapping[str, torch.Tensor], keys: list[str]) -> None:
    strategy = getattr(strategy, "strategy", strategy)
    for attr in _STRATEGY_STATE:
        prefix = f"{_STATE_PREFIX}{attr}::"
        values = {k.removeprefix(prefix): t.numpy() for k, t in tensors.items() if k.startswith(prefix)}
        if values:
            setattr(strategy, attr, [values[k] for k in keys] if attr == "momentum_vector" else values)


def _start(settings: Settings, run_config: Mapping[str, Any], config_text: str, strategy: Strategy
           ) -> RunState:
    """A new run, or with `resume` the last complete round's checkpoint (refused if settings changed)."""
    model = initial_model(parse_config(config_text))
    keys = exchanged_keys(model, settings.batchnorm)
    latest = latest_checkpoint(settings.out / "checkpoints")
    if latest is None:
        if settings.resume:
            log(WARNING, "%s nothing to resume in %s: a new run starts", MARKER, settings.out / "checkpoints")
        token = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        return RunState(pack_weights(model.state_dict(), keys), keys, model.state_dict(), 0, token, [])
    if not settings.resume:
        raise ValueError(f"{settings.out} already holds a run ({latest.name}): set resume=true to continue "
                         "it, or choose another out-dir")
    checkpoint = load_checkpoint(latest)
    meta = checkpoint.metadata
    changed = sorted(k for k in {*meta["run-config"], *run_config}
                     if k not in _RESUMABLE and meta["run-config"].get(k) != run_config.get(k))
    changed += ["the config file's content"] * (meta["fedmammo-config"] != config_text)
    changed += ["the preprocessing version"] * (meta.get("inputs", 1) != INPUTS_VERSION)
    if changed:
        raise ValueError(f"{latest}: the run was started with different settings ({', '.join(changed)}); "
                         "resume it with the same ones, or choose another out-dir")
    restore_strategy_state(strategy, checkpoint.tensors, [WEIGHTS])
    log(INFO, "%s resuming after round %d from %s", MARKER, meta["round"], latest)
    return RunState(pack_weights(checkpoint.tensors, keys), keys, model.state_dict(), meta["round"],
                    meta["run-token"], meta["history"])


def global_weights(state: RunState) -> dict[str, torch.Tensor]:
    return unpack_weights(state.arrays, state.keys, state.template)


def _checkpoint_writer(settings: Settings, run_config: Mapping[str, Any], config_text: str,
                       strategy: Strategy, state: RunState) -> Callable[[], None]:
    """The round's checkpoint and metrics.csv, to be written (the returned call) while the next round
    runs: what it writes is copied now, since the next round changes the strategy's state and history."""
    tensors = global_weights(state) | strategy_state(strategy, [WEIGHTS])
    path = settings.out / "checkpoints" / f"round-{state.round:04d}.safetensors"
    metadata = {"round": state.round, "run-token": state.token, "history": list(state.history),
                "run-config": dict(run_config), "fedmammo-config": config_text, "inputs": INPUTS_VERSION}
    metrics = _metrics_csv(state.history)

    def write() -> None:
        save_checkpoint(path, tensors, metadata)
        mark_latest(path)
        write_atomic(settings.out / "metrics.csv", metrics)

    return write


def _metrics_csv(history: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, _CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: row.get(k) for k in _CSV_COLUMNS} for row in history])
    return out.getvalue()


def _wait_for_nodes(grid: Grid, settings: Settings) -> None:
    """Flower's own wait for `min_available_nodes` has no time limit; this one has."""
    deadline = time.monotonic() + settings.node_wait_timeout
    while (connected := len(list(grid.get_node_ids()))) < settings.min_nodes:
        if time.monotonic() > deadline:
            raise RoundError(f"only {connected} SuperNode(s) connected after "
                             f"{settings.node_wait_timeout:.0f} s; the run needs {settings.min_nodes}")
        time.sleep(1)


def _successful(replies: Iterable[Message], asked: Sequence[int], what: str, settings: Settings,
                attendance: Attendance, everyone_asked: bool = True, minimum: int = 1
                ) -> tuple[list[Message], list[str]]:
    """The replies without error, by site name, and the sites missing from the exchange
    (`server.attendance`); an error when none replied, or fewer than `minimum` (a failed round)."""
    replies, sent, timeout = list(replies), len(asked), settings.round_timeout
    failed = [r for r in replies if r.has_error()]
    for reply in failed:
        log(WARNING, "%s %s: a site failed (node %d): %s", MARKER, what, reply.metadata.src_node_id,
            reply.error.reason)
    good = sorted((r for r in replies if not r.has_error()),
                  key=lambda r: (site_name(r), r.metadata.src_node_id))
    if not good:
        reasons = "; ".join(sorted({_last_line(r.error.reason) for r in failed if r.error.reason}))
        raise RoundError(f"{what}: no site replied: {len(failed)} of {sent} failed"
                         + (f" ({reasons})" if reasons else "")
                         + f", {sent - len(replies)} did not answer within {timeout:.0f} s")
    names = [site_name(r) for r in good]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"several SuperNodes report site-name {', '.join(duplicates)}: give each its own")
    missing = attendance.missing(asked, good, everyone_asked)
    if missing:
        log(WARNING, "%s %s: missing %s (failed, or no reply within %.0f s)", MARKER, what,
            ", ".join(missing), timeout)
    if len(good) < minimum:
        raise RoundError(f"{what}: only {len(good)} site(s) replied ({', '.join(names)}; missing: "
                         f"{', '.join(missing) or 'none'}), min-nodes is {minimum}: resume the run "
                         "(resume=true) when enough sites are back")
    return good, missing


def _missing_rows(server_round: int, phase: str, missing: Iterable[str]) -> list[dict[str, Any]]:
    return [{"round": server_round, "phase": phase, "site": site, "missing": 1} for site in missing]


def _last_line(text: str) -> str:
    """A failure's gist: the last line of a traceback, shortened."""
    return text.strip().splitlines()[-1][:300]


def _broadcast(grid: Grid, message_type: str, content: RecordDict, what: str, settings: Settings,
               attendance: Attendance) -> tuple[list[Message], list[str]]:
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    return _successful(grid.send_and_receive(messages, timeout=settings.round_timeout), nodes, what, settings,
                       attendance)


def _evaluation(grid: Grid, settings: Settings, config_text: str, state: RunState, final: bool,
                attendance: Attendance) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Exchange 1 (and at the end exchange 2) of the federated evaluation of the current global model;
    returns the metrics rows, the analysis and the sites' summaries."""
    started = time.perf_counter()
    what = f"round {state.round} evaluation"
    config = {"fedmammo-config": config_text, "run-token": state.token, "weight-keys": state.keys,
              "server-round": state.round, "stats-min-count": settings.stats_min_count}
    if final and settings.baselines:
        config |= {"baseline-epochs": settings.rounds * settings.local_epochs,
                   "baseline-steps": settings.rounds * settings.local_steps}
    content = RecordDict({"arrays": state.arrays, "config": ConfigRecord(config)})
    replies, missing = _broadcast(grid, MessageType.EVALUATE, content, what, settings, attendance)
    summaries = [_site_json(r, "summary") for r in replies]
    site_sums = None
    if final:
        raters, _ = common_raters(summaries)
        pooled = {g: h for g, h in pool_groups(summaries, list(raters)).items() if estimable(h)}
        if ALL in pooled:
            query = ConfigRecord({**config, "pooled": to_json(pooled)})
            answers, _ = _broadcast(grid, MessageType.QUERY, RecordDict({"config": query}), f"{what} (sums)",
                                    settings, attendance)
            site_sums = {site_name(a): _site_json(a, "sums") for a in answers}
            if set(site_sums) != {s["site"] for s in summaries}:
                log(WARNING, "%s not every site sent its sums: no paired tests", MARKER)
                site_sums = None
    analysis = federated_analysis(summaries, site_sums)
    for site, note in not_estimable(analysis).items():
        log(WARNING, "%s %s: site %s: %s", MARKER, what, site, note)
    seconds = time.perf_counter() - started
    rows = [_evaluation_row(state.round, s["site"], analysis["subgroups"][SITE_GROUP.format(s["site"])],
                            s["loss"], seconds) for s in summaries]
    n = sum(r["n"] for r in rows)
    loss = sum(r["loss"] * r["n"] for r in rows) / n
    rows.append(_evaluation_row(state.round, ALL, analysis, loss, seconds))
    return rows + _missing_rows(state.round, "evaluate", missing), analysis, summaries


def _site_json(reply: Message, key: str) -> dict[str, Any]:
    return decode(str(reply.content[SITE][key]), key, site_name(reply))


def _evaluation_row(server_round: int, site: str, table: Mapping[str, Any], loss: float, seconds: float
                    ) -> dict[str, Any]:
    model = table["raters"][MODEL]
    low, high = model["auc_ci"] or (None, None)
    return {"round": server_round, "phase": "evaluate", "site": site, "n": table["n_cases"], "loss": loss,
            "auc": model["auc"], "auc_low": low, "auc_high": high, "sensitivity": model["sensitivity"],
            "specificity": model["specificity"], "accuracy": model["accuracy"], "seconds": seconds}


def _log_rows(rows: Iterable[Mapping[str, Any]]) -> None:
    for row in rows:
        if row.get("missing"):  # logged as a warning when the exchange ended
            continue
        auc = "" if row.get("auc") is None else f", AUC {row['auc']:.3f}"
        if row.get("auc_low") is not None:
            auc += f" ({row['auc_low']:.3f}–{row['auc_high']:.3f})"
        if row.get("epsilon") is not None:  # the privacy spent so far (`server.privacy`, `client.dp`)
            auc += f", ε {row['epsilon']:.3f}"
        log(INFO, "%s round %d %s %s: n=%d loss %.4f%s (%.1f s)", MARKER, row["round"], row["phase"],
            row["site"], row["n"], row["loss"], auc, row["seconds"])


def _train_round(grid: Grid, context: Context, settings: Settings, config_text: str, strategy: Strategy,
                 state: RunState, server_round: int, attendance: Attendance, ledger: Ledger
                 ) -> tuple[ArrayRecord, list[dict[str, Any]]]:
    """One training round: send the global weights to the sampled sites, screen what they send back,
    aggregate it (in the clear, or under SecAgg+); returns the new global weights and the metrics rows."""
    started = time.perf_counter()
    what = f"round {server_round} training"
    _wait_for_nodes(grid, settings)
    random.seed(f"{state.token}/{server_round}")  # Flower's strategies sample sites with `random`
    train_config = ConfigRecord({"fedmammo-config": config_text, "run-token": state.token,
                                 "weight-keys": state.keys, "local-epochs": settings.local_epochs,
                                 "local-steps": settings.local_steps,
                                 "num-server-rounds": settings.rounds, CENTRAL_DP: settings.central_dp})
    messages = list(strategy.configure_train(server_round, state.arrays, train_config, grid))
    ledger.configured(server_round, len(messages), strategy)
    if settings.secagg:  # the center sees only the mean of the updates (server.secagg)
        arrays, sent = secure_round(grid, context, settings, server_round, messages, weighting(settings))
    else:
        sent = grid.send_and_receive(messages, timeout=settings.round_timeout)
    replies, missing = _successful(sent, [m.metadata.dst_node_id for m in messages], what, settings,
                                   attendance, everyone_asked=settings.fraction_train >= 1,
                                   minimum=settings.min_nodes)
    if not settings.secagg:
        replies, rejected = screen_updates(replies, state.arrays, what, max_norm=settings.max_update_norm,
                                           norm_factor=settings.update_norm_factor)
        if not replies:
            raise RoundError(f"{what}: every update was rejected: {'; '.join(rejected)}")
        arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise RoundError(f"round {server_round}: the strategy could not aggregate the sites' weights")
    # FedAdam's step comes out in float64; the model and its checkpoint are float32, and a resumed run
    # must continue from exactly what an uninterrupted one holds.
    arrays = ArrayRecord({k: Array(a.numpy().astype(np.float32, copy=False)) for k, a in arrays.items()})
    released = ledger.release(server_round, len(replies), strategy)
    rows = [{"round": server_round, "phase": "train", "site": site_name(r),
             "n": int(r.content["metrics"]["num-examples"]), "loss": float(r.content["metrics"]["loss"]),
             "seconds": float(r.content["metrics"]["seconds"]),
             "epsilon": r.content["metrics"].get("epsilon")} for r in replies]
    n = sum(r["n"] for r in rows)
    rows.append({"round": server_round, "phase": "train", "site": ALL, "n": n,
                 "loss": sum(r["loss"] * r["n"] for r in rows) / n,
                 "seconds": time.perf_counter() - started, **released})
    return arrays, rows + _missing_rows(server_round, "train", missing)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The server's torch work is copying ~700 small tensors (packing, checkpoints): a second thread only
    # adds synchronisation, which made it 15× slower on a busy 2-core machine.
    set_threads(1)
    settings = Settings.from_run_config(context.run_config)
    config_text = settings.config_path.read_text()
    config = parse_config(config_text)
    strategy = make_strategy(settings, config)
    state = _start(settings, context.run_config, config_text, strategy)
    attendance = Attendance(state.history)
    ledger = Ledger.of(settings)
    ledger.restore(state.history, strategy)
    log(INFO, "%s run %s: %d rounds of %s, output in %s", MARKER, state.token, settings.rounds,
        settings.strategy, settings.out)
    # A round's checkpoint is written while the next round trains (27 MB, a checksum and an fsync are
    # ~0.2 s, off the critical path). One at a time, in round order; a crash mid-write leaves the previous
    # round's checkpoint, from which `resume` repeats the round exactly.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") as writer:
        written: Future[None] | None = None
        for server_round in range(state.round + 1, settings.rounds + 1):
            arrays, rows = _train_round(grid, context, settings, config_text, strategy, state, server_round,
                                        attendance, ledger)
            state.arrays, state.round = arrays, server_round
            if settings.eval_every and server_round % settings.eval_every == 0 \
                    and server_round < settings.rounds:
                rows += _evaluation(grid, settings, config_text, state, final=False, attendance=attendance)[0]
            _log_rows(rows)
            state.history += rows
            write = _checkpoint_writer(settings, context.run_config, config_text, strategy, state)
            if written is not None:
                written.result()  # the previous round's, raising its error if it failed
            written = writer.submit(write)
        if written is not None:
            written.result()
    rows, analysis, summaries = _evaluation(grid, settings, config_text, state, final=True,
                                            attendance=attendance)
    _log_rows(rows)
    state.history += rows
    write_atomic(settings.out / "metrics.csv", _metrics_csv(state.history))
    if settings.batchnorm == "average":  # with FedBN there is no one global model
        save_checkpoint(settings.out / "global.safetensors", {**state.template, **global_weights(state)},
                        {**model_metadata(config), "round": state.round, "run-token": state.token})
    folder = write_report(settings.out / "report", {
        "run": {"token": state.token, "rounds": state.round, "strategy": settings.strategy,
                "batchnorm": settings.batchnorm, "run-config": dict(context.run_config),
                "config": config_dict(config)},
        "sites": [{k: s[k] for k in ("site", "counts", "loss", "birads_accuracy", "skipped")}
                  for s in summaries],
        "evaluation": analysis,
        "rounds": state.history,
        "privacy": privacy_report(ledger, state.history, config),
    })
    log(INFO, "%s report: %s", MARKER, folder / "report.md")
