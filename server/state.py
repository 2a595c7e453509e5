"""The run's state at the center: the global weights, the round, the strategy's own state (server momentum,
Adam moments) and the metrics so far, kept in one checkpoint per round, atomically; and resume, which
continues from the last complete round and ends as an uninterrupted run would, or is refused with the
reason (the one rule of `common.checkpoint.resume_problems`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common import log
from flwr.serverapp.strategy import FedAvgM, Strategy
from torch import nn

from common.atomic import write_atomic
from common.checkpoint import (
    RUNTIME_SETTINGS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
    resume_problems,
    save_checkpoint,
)
from common.config import flat_config, parse_config
from common.model import initial_model
from common.preprocess import VERSION as INPUTS_VERSION
from common.protocol import WEIGHTS, pack_weights, unpack_weights
from server.console import MARKER
from server.settings import RESUMABLE, Settings, app_defaults

_STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")
"""Strategy attributes carried from round to round (FedAdam's moments, FedAvgM's momentum)."""
_STATE_PREFIX = "strategy::"
_CSV_COLUMNS = ("round", "phase", "site", "n", "loss", "auc", "auc_low", "auc_high", "sensitivity",
                "specificity", "accuracy", "seconds", "missing", "epsilon")
_CONFIG = "config:"
"""Prefix of the fedmammo config's settings among the run's settings compared on resume."""


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds: everything a resumed run needs to continue as if never stopped."""

    arrays: ArrayRecord
    """The global weights as sent (`common.protocol.pack_weights`)."""
    keys: list[str]
    """The names of the weights the server averages and sends, in their order in `arrays`."""
    template: dict[str, torch.Tensor]
    """The initial model's state: the shapes of `arrays`' parts, and what the server does not average."""
    round: int
    token: str
    """Names this run's folder at each site (its predictions, the state it keeps)."""
    history: list[dict[str, Any]]

    def global_weights(self) -> dict[str, torch.Tensor]:
        return unpack_weights(self.arrays, self.keys, self.template)


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


def align_strategy(strategy: Strategy, arrays: ArrayRecord) -> None:
    """Before a round: FedAvgM takes its pseudo-gradient against its own copy of the weights it last
    returned, which is not the global model when a central DP wrapper noised them afterwards, nor after a
    resume. The round's reference is the weights the sites are sent, as checkpointed."""
    inner = getattr(strategy, "strategy", strategy)
    if isinstance(inner, FedAvgM):
        inner.current_arrays = arrays


def restore_strategy_state(strategy: Strategy, tensors: Mapping[str, torch.Tensor], keys: list[str]) -> None:
    strategy = getattr(strategy, "strategy", strategy)
    for attr in _STRATEGY_STATE:
        prefix = f"{_STATE_PREFIX}{attr}::"
        values = {k.removeprefix(prefix): t.numpy() for k, t in tensors.items() if k.startswith(prefix)}
        if values:
            setattr(strategy, attr, [values[k] for k in keys] if attr == "momentum_vector" else values)


def _run_settings(run_config: Mapping[str, Any], config_text: str, source: str) -> dict[str, Any]:
    """The run config and the fedmammo config's settings, by name, as resume compares them."""
    config = parse_config(config_text, source)
    return {**run_config, **{_CONFIG + k: v for k, v in flat_config(config).items()}}


def start(settings: Settings, run_config: Mapping[str, Any], config_text: str, strategy: Strategy
          ) -> RunState:
    """A new run, or with `resume` the last complete round's checkpoint (refused unless the resumed run
    ends exactly as an uninterrupted one with these settings would)."""
    config = parse_config(config_text, str(settings.config_path))
    model = initial_model(config)
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
    if meta.get("inputs", 1) != INPUTS_VERSION:
        raise CheckpointError(f"{latest}: the run was started on inputs of preprocessing version "
                              f"{meta.get('inputs', 1)}; this fedmammo makes version {INPUTS_VERSION}: "
                              "choose another out-dir")
    try:
        # a key a later fedmammo added counts as its default (a new key's default keeps the old behaviour)
        stored = _run_settings({**app_defaults(), **meta["run-config"]}, meta["fedmammo-config"],
                               f"{latest} (stored config)")
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{latest}: the run's stored settings cannot be read ({exc})") from exc
    # The config file may move (its settings are compared one by one); train.epochs is not a federated
    # run's length (num-server-rounds is).
    free = RESUMABLE | {"config"} | {_CONFIG + k for k in (*RUNTIME_SETTINGS, "train.epochs")}
    current = _run_settings(run_config, config_text, str(settings.config_path))
    problems = resume_problems(stored, current, length="num-server-rounds",
                               config=config, free=free)
    if problems:
        raise ValueError(f"{latest}: cannot resume exactly: the run was started with {'; '.join(problems)}; "
                         "resume it with the same settings, or choose another out-dir")
    restore_strategy_state(strategy, checkpoint.tensors, [WEIGHTS])
    log(INFO, "%s resuming after round %d from %s", MARKER, meta["round"], latest)
    return RunState(pack_weights(checkpoint.tensors, keys), keys, model.state_dict(), meta["round"],
                    meta["run-token"], meta["history"])


def checkpoint_writer(settings: Settings, run_config: Mapping[str, Any], config_text: str,
                      strategy: Strategy, state: RunState) -> Callable[[], None]:
    """The round's checkpoint and metrics.csv, to be written (the returned call) while the next round
    runs: what it writes is copied now, since the next round changes the strategy's state and history."""
    tensors = state.global_weights() | strategy_state(strategy, [WEIGHTS])
    path = settings.out / "checkpoints" / f"round-{state.round:04d}.safetensors"
    metadata = {"round": state.round, "run-token": state.token, "history": list(state.history),
                "run-config": dict(run_config), "fedmammo-config": config_text, "inputs": INPUTS_VERSION}
    metrics = metrics_csv(state.history)

    def write() -> None:
        save_checkpoint(path, tensors, metadata)
        mark_latest(path)
        write_atomic(settings.out / "metrics.csv", metrics)

    return write


def metrics_csv(history: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, _CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: row.get(k) for k in _CSV_COLUMNS} for row in history])
    return out.getvalue()


def write_metrics(out: Path, history: Iterable[Mapping[str, Any]]) -> None:
    write_atomic(out / "metrics.csv", metrics_csv(history))
