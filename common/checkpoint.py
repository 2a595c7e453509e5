"""Checkpoints: a state dict of tensors plus JSON metadata in one safetensors file.

Files are written atomically (temp file in the same folder, fsync, os.replace), so a crash leaves the old
file or the new one, never half of one; a SHA-256 of the metadata and every tensor is stored in the file
and verified on load, so a corrupted checkpoint is refused rather than trained on. A `latest` file next to
the checkpoints names the newest one, which is what a resumed run starts from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from common.atomic import write_atomic
from common.config import Config, config_dict, config_from_dict
from common.preprocess import VERSION as INPUTS_VERSION

LATEST = "latest"
OPTIMIZER_PREFIX = "optimizer::"
"""Tensors whose name starts with this are optimizer state; the rest are model weights."""
_METADATA = "fedmammo"
_CHECKSUM = "fedmammo.sha256"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or does not fit."""


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]

    def model_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}


def _digest(tensors: Mapping[str, Tensor], metadata: str) -> str:
    h = hashlib.sha256(metadata.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write tensors (any device; stored on CPU) and JSON-serialisable metadata to `path` atomically."""
    path = Path(path)
    cpu = {k: v.detach().to("cpu", copy=False).contiguous() for k, v in tensors.items()}
    meta = json.dumps(dict(metadata or {}), sort_keys=True)
    data = safetensors.torch.save(cpu, metadata={_METADATA: meta, _CHECKSUM: _digest(cpu, meta)})
    write_atomic(path, data)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint; `CheckpointError` names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or not safetensors): {exc}") from exc
    if _METADATA not in header or _CHECKSUM not in header:
        raise CheckpointError(f"{path}: not a fedmammo checkpoint (no metadata or checksum)")
    if _digest(tensors, header[_METADATA]) != header[_CHECKSUM]:
        raise CheckpointError(f"{path}: checksum mismatch: the checkpoint is corrupted")
    tensors = {k: v.to(device) for k, v in tensors.items()}
    return Checkpoint(tensors, json.loads(header[_METADATA]))


def mark_latest(path: str | Path) -> None:
    """Point the folder's `latest` file at `path` (after `path` is completely written)."""
    path = Path(path)
    write_atomic(path.parent / LATEST, path.name + "\n")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint the folder's `latest` file names, or None when there is none yet."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which does not exist")
    return path


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state as tensors (prefixed with OPTIMIZER_PREFIX) plus JSON for the rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, checkpoint: Checkpoint, meta: Mapping[str, Any]
) -> None:
    """Inverse of `optimizer_tensors`: `meta` is the JSON part it returned, stored in the metadata."""
    state: dict[int, dict[str, Any]] = {}
    entries = [(k.removeprefix(OPTIMIZER_PREFIX), v) for k, v in checkpoint.tensors.items()
               if k.startswith(OPTIMIZER_PREFIX)]
    for key, value in [*entries, *meta["scalars"].items()]:
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state does not fit this model: {exc}") from exc


def model_metadata(config: Config) -> dict[str, Any]:
    """What a checkpoint of trained weights records of how they were made, for `config_of`."""
    return {"config": config_dict(config), "inputs": INPUTS_VERSION}


def config_of(checkpoint: Checkpoint, source: Path) -> Config:
    """The config a checkpoint was trained with; weights trained on other inputs are refused."""
    inputs = checkpoint.metadata.get("inputs", 1)  # version 1 did not record itself
    if inputs != INPUTS_VERSION:
        raise CheckpointError(f"{source}: trained on inputs of preprocessing version {inputs}, but this "
                              f"fedmammo makes version {INPUTS_VERSION}; retrain, or use the fedmammo "
                              "release that trained these weights")
    try:
        return config_from_dict(checkpoint.metadata["config"], f"{source} (stored config)")
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: no stored config in the checkpoint metadata") from exc


RUNTIME_SETTINGS = frozenset({"train.num_threads", "train.device", "data.workers", "data.cache_dir",
                              "data.decode_timeout_s"})
"""Config settings that change how fast, or where, the weights are computed, not what they are."""


def length_dependence(config: Config) -> str | None:
    """Why the run's planned length changes what its first epochs or rounds compute, or None."""
    if config.train.lr_schedule != "constant":
        return (f"the {config.train.lr_schedule} learning-rate schedule spans the whole run: its length sets "
                "every epoch's learning rate")
    if config.privacy.dp_sgd and config.privacy.noise_multiplier == 0:
        return "DP-SGD's noise is calibrated to spend target_epsilon over the planned length"
    return None


def resume_problems(stored: Mapping[str, Any], current: Mapping[str, Any], *, length: str, config: Config,
                    free: Iterable[str] = RUNTIME_SETTINGS) -> list[str]:
    """The one rule of every resume (`fedmammo train --resume`, a federated run's `resume`): a run continues
    only where it ends exactly as an uninterrupted run with the current settings would. `stored` and
    `current` are the settings by name; those in `free` may change. `length`, the run's planned length
    (`train.epochs`, `num-server-rounds`), may change only where nothing computed so far depends on it
    (`length_dependence`): a run with a constant learning rate can be extended, a cosine one cannot.
    Returns each refused change with its reason (empty: the resume is exact)."""
    free = set(free)
    problems = [f"{k} = {stored.get(k)!r} (now {current.get(k)!r})" for k in sorted({*stored, *current})
                if k not in free and k != length and stored.get(k) != current.get(k)]
    if stored.get(length) != current.get(length) and (reason := length_dependence(config)):
        problems.append(f"{length} = {stored.get(length)!r} (now {current.get(length)!r}): {reason}")
    return problems
