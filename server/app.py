"""The ServerApp: the coordinating center's side of a federated run (Flower's Message API).

Each round the strategy (`server.strategy`) samples sites and sends them the global weights; their trained
weights are screened (`server.sanity`) and aggregated, in the clear or under SecAgg+ (`server.secagg`), in
a fixed order (by site name) so that a run repeats exactly. The round's state then goes to a checkpoint
while the next round runs (`server.state`); `resume` continues from the last complete round.

Every `eval-every` rounds, and at the end, the federated evaluation scores the global model at every site;
the final one adds the paired tests (`server.evaluation`) and writes the report (`server.report`).
Settings (`server.settings`) come from the run config and are all checked, with the federation's fedmammo
config, before round 1. Messages are built and read by `common.protocol`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MessageType
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.checkpoint import model_metadata, save_checkpoint
from common.config import config_dict, parse_config
from common.protocol import (
    ALL,
    ARRAYS,
    CONFIG,
    MODEL,
    SUMMARY,
    SUMS,
    EvaluateInstruction,
    TrainInstruction,
    cast_weights,
    site_name,
    site_payload,
    to_json,
    train_report,
)
from common.runtime import set_threads
from server.attendance import Attendance
from server.console import MARKER
from server.evaluation import (
    SITE_GROUP,
    common_raters,
    estimable,
    federated_analysis,
    not_estimable,
    pool_groups,
)
from server.exchange import RoundError, broadcast, missing_rows, successful, wait_for_nodes
from server.privacy import Ledger, privacy_report
from server.report import synthetic_ceiling, write_report
from server.sanity import screen_updates
from server.secagg import secure_round
from server.settings import Settings
from server.state import RunState, align_strategy, checkpoint_writer, start, write_metrics
from server.strategy import make_strategy, weighting

app = ServerApp()


def _evaluation(grid: Grid, settings: Settings, config_text: str, state: RunState, final: bool,
                attendance: Attendance) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Exchange 1 (and at the end exchange 2) of the federated evaluation of the current global model;
    returns the metrics rows, the analysis and the sites' summaries."""
    started = time.perf_counter()
    what = f"round {state.round} evaluation"
    baseline = final and settings.baselines
    task = EvaluateInstruction(fedmammo_config=config_text, run_token=state.token, weight_keys=state.keys,
                               server_round=state.round, stats_min_count=settings.stats_min_count,
                               baseline_epochs=settings.rounds * settings.local_epochs if baseline else 0,
                               baseline_steps=settings.rounds * settings.local_steps if baseline else 0,
                               final=final)
    # The final evaluation scores exactly the float32 model the center and the sites keep
    sent = state.arrays if final else cast_weights(state.arrays, settings.transfer_dtype)
    replies, missing = broadcast(grid, MessageType.EVALUATE, task.message(sent), what, settings, attendance)
    summaries = [site_payload(r, SUMMARY) for r in replies]
    site_sums = None
    if final:
        raters, _ = common_raters(summaries)
        pooled = {g: h for g, h in pool_groups(summaries, list(raters)).items() if estimable(h)}
        if ALL in pooled:
            answers, _ = broadcast(grid, MessageType.QUERY, task.query(to_json(pooled)).message(),
                                   f"{what} (sums)", settings, attendance)
            site_sums = {site_name(a): site_payload(a, SUMS) for a in answers}
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
    return rows + missing_rows(state.round, "evaluate", missing), analysis, summaries


def _evaluation_row(server_round: int, site: str, table: Mapping[str, Any], loss: float, seconds: float
                    ) -> dict[str, Any]:
    model = table["raters"][MODEL]
    low, high = model["auc_ci"] or (None, None)
    return {"round": server_round, "phase": "evaluate", "site": site, "n": table["n_cases"], "loss": loss,
            "auc": model["auc"], "auc_low": low, "auc_high": high, "sensitivity": model["sensitivity"],
            "specificity": model["specificity"], "accuracy": model["accuracy"], "seconds": seconds}


def _log_rows(rows: Iterable[Mapping[str, Any]]) -> None:
    """The rounds' progress on the console (the launcher echoes lines with MARKER)."""
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
    wait_for_nodes(grid, settings)
    random.seed(f"{state.token}/{server_round}")  # Flower's strategies sample sites with `random`
    task = TrainInstruction(fedmammo_config=config_text, run_token=state.token, weight_keys=state.keys,
                            local_epochs=settings.local_epochs, local_steps=settings.local_steps,
                            num_server_rounds=settings.rounds, central_dp=settings.central_dp)
    align_strategy(strategy, state.arrays)
    messages = list(strategy.configure_train(server_round, state.arrays, task.record(), grid))
    ledger.configured(server_round, len(messages), strategy)
    if settings.transfer_dtype != "float32":  # the strategy keeps the float32 weights it configured with
        wire = cast_weights(state.arrays, settings.transfer_dtype)
        for message in messages:
            message.content[ARRAYS] = wire
    if settings.secagg:  # the center sees only the mean of the updates (server.secagg)
        arrays, sent = secure_round(grid, context, settings, server_round, messages, weighting(settings))
    else:
        sent = grid.send_and_receive(messages, timeout=settings.round_timeout)
    replies, missing = successful(sent, [m.metadata.dst_node_id for m in messages], what, settings,
                                  attendance, everyone_asked=settings.fraction_train >= 1,
                                  minimum=settings.min_nodes)
    if not settings.secagg:
        # sites that clip their update for central DP: clipped again once decoded (half precision)
        clip_to = float(messages[0].content[CONFIG].get(KEY_CLIPPING_NORM, 0.0)) if messages else 0.0
        replies, rejected = screen_updates(replies, state.arrays, what, max_norm=settings.max_update_norm,
                                           norm_factor=settings.update_norm_factor, clip_to=clip_to)
        if not replies:
            raise RoundError(f"{what}: every update was rejected: {'; '.join(rejected)}")
        arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise RoundError(f"round {server_round}: the strategy could not aggregate the sites' weights")
    # FedAdam's step comes out in float64; the model and its checkpoint are float32, and a resumed run
    # must continue from exactly what an uninterrupted one holds.
    if any(a.dtype != "float32" for a in arrays.values()):
        arrays = ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()})
    released = ledger.release(server_round, len(replies), strategy)
    reports = [(site_name(r), train_report(r)) for r in replies]
    rows = [{"round": server_round, "phase": "train", "site": site, "n": report.num_examples,
             "loss": report.loss, "seconds": report.seconds, "epsilon": report.epsilon}
            for site, report in reports]
    n = sum(r["n"] for r in rows)
    rows.append({"round": server_round, "phase": "train", "site": ALL, "n": n,
                 "loss": sum(r["loss"] * r["n"] for r in rows) / n,
                 "seconds": time.perf_counter() - started, **released})
    return arrays, rows + missing_rows(server_round, "train", missing)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The server's torch work is copying ~700 small tensors (packing, checkpoints): a second thread only
    # adds synchronisation, which made it 15× slower on a busy 2-core machine.
    set_threads(1)
    settings = Settings.from_run_config(context.run_config)
    config_text = settings.config_path.read_text()
    config = parse_config(config_text, str(settings.config_path))
    if problems := settings.config_problems(config):
        raise ValueError("run config: " + "; ".join(problems))
    strategy = make_strategy(settings, config)
    state = start(settings, context.run_config, config_text, strategy)
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
            write = checkpoint_writer(settings, context.run_config, config_text, strategy, state)
            if written is not None:
                written.result()  # the previous round's, raising its error if it failed
            written = writer.submit(write)
        if written is not None:
            written.result()
    rows, analysis, summaries = _evaluation(grid, settings, config_text, state, final=True,
                                            attendance=attendance)
    _log_rows(rows)
    state.history += rows
    write_metrics(settings.out, state.history)
    if settings.batchnorm == "average":  # with FedBN there is no one global model
        save_checkpoint(settings.out / "global.safetensors", {**state.template, **state.global_weights()},
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
        "ceiling": synthetic_ceiling(settings.data_root),  # a simulation over a synthetic cohort only
    })
    log(INFO, "%s report: %s", MARKER, folder / "report.md")
