"""Local training: `train_epochs`, the loop the federated client calls, and `fedmammo train`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from client.data import (
    ExamSet,
    chunks,
    device_generator,
    epoch_order,
    exam_set,
    loader_workers,
    pos_weight,
    stream,
)
from client.device import Runtime, resolve_runtime
from client.distributed import launch, rank_and_world
from client.evaluate import Metrics, evaluate
from client.prepare import PreparedSite, prepare_site
from common.atomic import write_atomic
from common.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_of,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
    model_metadata,
    optimizer_tensors,
    restore_optimizer,
    resume_problems,
    save_checkpoint,
)
from common.config import Config, TrainConfig, config_dict, flat_config, load_config
from common.model import MultiTaskLoss, build_model
from common.runtime import seed_everything, set_threads

if TYPE_CHECKING:  # opacus takes seconds to import: only DP-SGD runs pay for it
    from client.dp import PrivateSGD

LOG_EVERY = 10
"""Steps between progress-bar loss updates (each one waits for the device)."""


@dataclass
class TrainMetrics:
    loss: float
    """Mean multi-task loss per exam (without the FedProx term)."""
    steps: int
    exams: int
    seconds: float

    @property
    def exams_per_s(self) -> float:
        return self.exams / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


def scheduled_lr(train: TrainConfig, done: float) -> float:
    """The learning rate of an epoch that starts when fraction `done` of the run's epochs is done."""
    if train.lr_schedule == "constant":  # the config allows constant or cosine (`common.config`)
        return train.lr
    return train.lr * 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


def planned_steps(exams: int, batch_size: int, epochs: int, steps: int | None) -> int:
    """The batches `train_epochs` trains: `steps` when given, else `epochs` passes over `exams` exams."""
    return steps if steps is not None else epochs * math.ceil(exams / batch_size)


class Part(NamedTuple):
    """What one process computes of one optimiser step: a chunk of the step's batch."""

    index: list[int]
    scale: float
    """Its summed loss times this is its share of the batch's mean loss, averaged over processes."""
    first: bool
    last: bool


def step_plan(order: Tensor, batch_size: int, chunk: int, rank: int = 0, world: int = 1) -> list[Part]:
    """One epoch's batches of `batch_size` exams in `order`, each shared among `world` processes and each
    share cut into chunks of at most `chunk` exams (0 = no cut) whose gradients accumulate: the step's
    gradient is the whole batch's. Every process gets as many chunks, none empty, so that their gradient
    exchanges match (a share then holds a few more than `chunk` exams where the share sizes differ); a
    last batch with fewer exams than processes is left out."""
    plan = []
    for batch in chunks(order, batch_size):
        if len(batch) < world:
            continue
        smallest, largest = len(batch) // world, math.ceil(len(batch) / world)
        pieces = min(smallest, math.ceil(largest / chunk)) if chunk else 1
        share = [x.tolist() for x in torch.tensor(batch).tensor_split(world)][rank]
        cut = [x.tolist() for x in torch.tensor(share).tensor_split(pieces)]
        plan += [Part(piece, world / len(batch), k == 0, k == pieces - 1) for k, piece in enumerate(cut)]
    return plan


def train_epochs(
    model: nn.Module,
    train_data: ExamSet,
    config: Config,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    runtime: Runtime | None = None,
    generator: torch.Generator | None = None,
    global_weights: Mapping[str, Tensor] | None = None,
    mu: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    private: PrivateSGD | None = None,
    position: tuple[int, int] = (0, 0),
) -> TrainMetrics:
    """Train `model` in place for `epochs` passes over `train_data` (default `config.train.epochs`), or
    for exactly `steps` batches when given (epochs then repeat as needed).

    `optimizer` carries state across calls (a fresh AdamW when None); `generator` drives data order and
    augmentation (default: seeded from `config.train.seed`). With `mu` > 0, FedProx's proximal term
    mu/2 · ||w − w_global||² against `global_weights` (parameter name → tensor) is added to the loss.
    With `private` (`client.dp`), DP-SGD: Poisson-sampled batches, clipped per-exam gradients, noise.
    `position` = (epochs of the whole run done before this call, epochs in the whole run) places the
    call's epochs on `config.train.lr_schedule` (default: this call is the whole run).

    With `runtime.processes` > 1 the call trains in that many new processes, one per GPU
    (DistributedDataParallel: each computes a share of every batch), and `model` and `optimizer` receive
    the result; inside such a process the group is joined here.
    """
    if len(train_data) == 0:
        raise ValueError("no training exams")
    runtime = runtime or resolve_runtime(config.train, private=private is not None)
    generator = generator or seed_everything(config.train.seed)
    if private is not None and mu > 0:
        raise ValueError("DP-SGD with FedProx: the proximal term's gradient bypasses per-exam clipping")
    if runtime.processes > 1 and not dist.is_initialized():
        return _train_distributed(model, train_data, config, runtime, optimizer, generator,
                                  {"epochs": epochs, "steps": steps, "mu": mu, "position": position},
                                  global_weights)
    rank, world = rank_and_world()
    runtime.place(model)
    optimizer = optimizer or make_optimizer(model, config)
    anchors = _proximal_anchors(model, global_weights, runtime.device) if mu > 0 else []
    synced: DistributedDataParallel | None = None
    if private is not None:
        model, optimizer, poisson_batches = private.attach(model, optimizer, len(train_data))
        net = model
    else:
        net = runtime.compiled(model)
        if world > 1:
            gpu = [runtime.device] if runtime.device.type == "cuda" else None
            synced = DistributedDataParallel(model, device_ids=gpu)
            net = runtime.compiled(synced)
    criterion = MultiTaskLoss(config.model.birads_loss_weight, pos_weight(train_data, config.train.balance),
                              reduction="none")
    criterion.to(runtime.device)
    scaler = runtime.scaler()
    batch_size = config.train.batch_size
    total_steps = planned_steps(len(train_data), batch_size, epochs or config.train.epochs, steps)
    steps_per_epoch = planned_steps(len(train_data), batch_size, 1, None)
    if total_steps < 1:
        raise ValueError(f"nothing to train: {total_steps} steps")
    workers = 0 if private is not None else loader_workers(config.data, runtime.device)

    model.train()
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    done = exams = 0
    start = time.perf_counter()
    with tqdm(total=total_steps, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        first, run_epochs = position if position[1] else (0, math.ceil(total_steps / steps_per_epoch))
        epoch = 0
        while done < total_steps:
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(config.train, (first + epoch) / run_epochs)
            epoch += 1
            order = epoch_order(train_data, config.train.balance, generator)
            augment = device_generator(runtime.device, generator, rank) if config.train.augment else None
            if private is None:
                plan = step_plan(order, batch_size, config.train.physical_batch_size, rank, world)
                parts = zip(stream(train_data, [part.index for part in plan], runtime.device, workers=workers,
                                   augment_generator=augment), plan, strict=True)
            else:  # Opacus's loader signals the chunks' steps as it is read: lazily, in this process
                poisson = (index.tolist() for index in poisson_batches())
                parts = ((batch, None) for batch in stream(train_data, poisson, runtime.device,
                                                           augment_generator=augment))
            for batch, part in parts:
                if part is None or part.first:
                    optimizer.zero_grad(set_to_none=True)
                wait = synced is not None and part is not None and not part.last
                with synced.no_sync() if wait else contextlib.nullcontext():  # type: ignore[union-attr]
                    with runtime.autocast():
                        outputs = net(batch.views)
                    losses = criterion(outputs, batch.malignant, batch.birads_class)
                    if part is None:  # DP-SGD: Opacus's accounting of a chunk expects the chunk's mean
                        objective = losses.mean()
                    else:
                        objective = losses.sum() * part.scale
                        if anchors:
                            proximal = mu / 2 * sum((p - a).pow(2).sum() for p, a in anchors)
                            objective = objective + proximal * len(part.index) * part.scale
                    scaler.scale(objective).backward()
                loss_sum += losses.detach().sum()
                exams += len(batch.views)
                if part is not None and not part.last:
                    continue  # a chunk of the step's batch (`physical_batch_size`)
                scaler.step(optimizer)
                scaler.update()
                if private is not None and not private.stepped():
                    continue  # a chunk of a DP-SGD batch (`physical_batch_size`)
                done += 1
                bar.update()
                if progress and (done % LOG_EVERY == 0 or done == total_steps):
                    bar.set_postfix(loss=f"{float(loss_sum) / exams:.4f}")
                if done == total_steps:
                    break
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    if private is not None:
        private.detach()
    if world > 1:  # the loss over every process's exams
        totals = torch.stack([loss_sum, torch.tensor(exams, device=runtime.device, dtype=torch.float64)])
        dist.all_reduce(totals)
        loss_sum, exams = totals[0], int(totals[1])
    return TrainMetrics(float(loss_sum) / max(exams, 1), done, exams, time.perf_counter() - start)


def _train_distributed(model: nn.Module, data: ExamSet, config: Config, runtime: Runtime,
                       optimizer: torch.optim.Optimizer | None, generator: torch.Generator,
                       options: dict[str, Any], global_weights: Mapping[str, Tensor] | None) -> TrainMetrics:
    """`train_epochs` in `runtime.processes` processes (`client.distributed`), all drawing the same order
    from one seed; process 0 hands back the weights, the optimiser's state and the metrics."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with tempfile.TemporaryDirectory(prefix="fedmammo-ddp-") as tmp:
        folder = Path(tmp)
        anchor = dict(global_weights) if global_weights is not None else None
        kept = (None, None, None) if optimizer is None else (  # the same optimiser in every process
            type(optimizer).__name__, optimizer.defaults, optimizer.state_dict())
        torch.save({"model": model.state_dict(), "optimizer": kept, "global": anchor}, folder / "start.pt")
        launch(_train_process, runtime.processes, runtime.device.type == "cuda", folder, data, config,
               runtime, seed, options)
        result = torch.load(folder / "end.pt", weights_only=True)
    model.load_state_dict(result["model"])
    if optimizer is not None:
        optimizer.load_state_dict(result["optimizer"])
    return TrainMetrics(**result["metrics"])


def _train_process(rank: int, device: torch.device, folder: Path, data: ExamSet, config: Config,
                   runtime: Runtime, seed: int, options: dict[str, Any]) -> None:
    """One process of `_train_distributed`."""
    start = torch.load(folder / "start.pt", weights_only=True, map_location="cpu")  # not where rank 0's were
    model = build_model(dataclasses.replace(config.model, pretrained=None), config.data.bilateral)
    model.load_state_dict(start["model"])
    runtime = dataclasses.replace(runtime, device=device, processes=1)
    runtime.place(model)
    kind, defaults, state = start["optimizer"]
    optimizer = (getattr(torch.optim, kind)(model.parameters(), **defaults) if kind
                 else make_optimizer(model, config))
    if state is not None:
        optimizer.load_state_dict(state)
    metrics = train_epochs(model, data, config, optimizer=optimizer, runtime=runtime,
                           generator=torch.Generator().manual_seed(seed), global_weights=start["global"],
                           progress=False, **options)
    if rank == 0:
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "metrics": dataclasses.asdict(metrics)},
                   folder / "end.pt")


def _proximal_anchors(
    model: nn.Module, global_weights: Mapping[str, Tensor] | None, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    if global_weights is None:
        raise ValueError("FedProx (mu > 0) needs the global weights")
    anchors = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if name not in global_weights:
                raise ValueError(f"global weights lack parameter {name!r}")
            anchors.append((param, global_weights[name].detach().to(device, param.dtype)))
    return anchors


# --- fedmammo train ---------------------------------------------------------------------------------------


def load_weights(model: nn.Module, checkpoint: Checkpoint, source: Path) -> None:
    try:
        model.load_state_dict(checkpoint.model_state())
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit the configured model: {exc}") from exc


def _selection_key(metrics: Metrics | None, epoch: int) -> float:
    """Best epoch: highest val AUC; by val loss where val lacks two exams of a class; the last without val."""
    if metrics is None:
        return float(epoch)
    return metrics.auc if metrics.auc is not None else -metrics.loss


def _load_sites(dirs: list[str], config: Config, cache_dir: Path) -> list[PreparedSite]:
    sites = []
    for folder in dirs:
        site = prepare_site(Path(folder), config, cache_dir=cache_dir, progress=sys.stderr.isatty())
        counts = ", ".join(f"{s} {len(site.split(s).exam_ids)}" for s in ("train", "val", "test"))
        print(f"{folder}: {len(site.exam_ids)} exams ({counts}), {len(site.rejections)} rejected",
              file=sys.stderr)
        for rejection in site.rejections:
            print(f"  skipped {rejection.source}: {rejection.reason}", file=sys.stderr)
        sites.append(site)
    return sites


def _resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Config) -> dict[str, Any]:
    """Restore model and optimizer from the latest epoch checkpoint; return its training state."""
    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch", file=sys.stderr)
        return {"epoch": 0, "history": [], "best": None}
    checkpoint = load_checkpoint(path)
    problems = resume_problems(flat_config(config_of(checkpoint, path)), flat_config(config),
                               length="train.epochs", config=config)
    if problems:
        raise CheckpointError(f"{path}: cannot resume exactly: trained with {'; '.join(problems)}; "
                              "use the same config or a new --out")
    load_weights(model, checkpoint, path)
    restore_optimizer(optimizer, checkpoint, checkpoint.metadata["optimizer"])
    print(f"resuming after epoch {checkpoint.metadata['epoch']} from {path}", file=sys.stderr)
    return checkpoint.metadata["state"]


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        runtime = resolve_runtime(config.train)
        if config.privacy.dp_sgd:
            raise ValueError(f"{args.config}: [privacy] dp_sgd is for federated runs, where the model leaves "
                             "the site; `fedmammo train` keeps it at the site and does not do DP-SGD")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    checkpoints = out / "checkpoints"
    if not args.resume and (checkpoints / "latest").exists():
        print(f"error: {out} already holds a run: pass --resume to continue it, or choose another --out",
              file=sys.stderr)
        return 2
    set_threads(config.train.num_threads)
    started = time.perf_counter()
    try:
        seed_everything(config.train.seed)
        model = runtime.place(build_model(config.model, config.data.bilateral))
        optimizer = make_optimizer(model, config)  # after `place`: restored state follows the parameters
        state = (_resume(out, model, optimizer, config) if args.resume
                 else {"epoch": 0, "history": [], "best": None})
        sites = _load_sites(args.dirs, config, out / "cache")
        data = {split: exam_set(sites, split) for split in ("train", "val", "test")}
        if len(data["train"]) == 0:
            raise ValueError(f"no usable training exams in {', '.join(args.dirs)} (see `fedmammo check`)")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prepared_s = time.perf_counter() - started
    print(f"training on {len(data['train'])} exams ({int(data['train'].malignant.nansum())} malignant), "
          f"device {runtime.device}, precision {runtime.amp_dtype or 'fp32'}", file=sys.stderr)

    for epoch in range(state["epoch"], config.train.epochs):
        epoch_started = time.perf_counter()
        stats = train_epochs(model, data["train"], config, epochs=1, optimizer=optimizer, runtime=runtime,
                             generator=seed_everything(config.train.seed, epoch),
                             position=(epoch, config.train.epochs),
                             progress=sys.stderr.isatty(), desc=f"epoch {epoch + 1}/{config.train.epochs}")
        val = evaluate(model, data["val"], config, runtime)[0] if len(data["val"]) else None
        state["history"].append({"epoch": epoch + 1, "train_loss": stats.loss, "train_seconds": stats.seconds,
                                 "exams_per_s": stats.exams_per_s, "val": val and val.to_dict()})
        key = _selection_key(val, epoch)
        if state["best"] is None or key > state["best"]["key"]:
            state["best"] = {"epoch": epoch + 1, "key": key}
            meta = {**model_metadata(config), "epoch": epoch + 1, "val": val and val.to_dict()}
            save_checkpoint(out / "best.safetensors", model.state_dict(), meta)
        state["epoch"] = epoch + 1
        state["history"][-1]["seconds"] = time.perf_counter() - epoch_started  # with val and checkpoints
        _save_epoch(checkpoints, epoch + 1, model, optimizer, config, state)
        tqdm.write(f"epoch {epoch + 1}: train loss {stats.loss:.4f} ({stats.exams_per_s:.1f} exams/s)"
                   + (f"; val {val.summary()}" if val else ""), file=sys.stderr)
    train_s = sum(epoch["seconds"] for epoch in state["history"])  # a resumed run's earlier epochs too

    best_path = out / "best.safetensors"
    load_weights(model, load_checkpoint(best_path), best_path)
    results = {split: evaluate(model, data[split], config, runtime)[0] if len(data[split]) else None
               for split in ("val", "test")}
    report = {
        "best_epoch": state["best"]["epoch"],
        "val": results["val"] and results["val"].to_dict(),
        "test": results["test"] and results["test"].to_dict(),
        "history": state["history"],
        "sites": [{"dir": d, "name": s.name, "exams": len(s.exam_ids), "rejected": len(s.rejections)}
                  for d, s in zip(args.dirs, sites, strict=True)],
        "exams": {split: len(d) for split, d in data.items()},
        "device": str(runtime.device),
        "precision": str(runtime.amp_dtype or "fp32"),
        "prepare_seconds": prepared_s,
        "train_seconds": train_s,
        "run_seconds": time.perf_counter() - started,
        "config": config_dict(config),
    }
    write_atomic(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    print(f"best epoch {report['best_epoch']} of {config.train.epochs}; training took {train_s:.0f} s "
          f"(this run {report['run_seconds']:.0f} s, reading the data {prepared_s:.0f} s)")
    for split, metrics in results.items():
        print(f"{split}: {metrics.summary()}" if metrics else f"{split}: no exams")
    print(f"wrote {out / 'metrics.json'} and {best_path}")
    return 0


def _save_epoch(folder: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: Config,
                state: dict[str, Any]) -> None:
    """Write this epoch's resumable checkpoint, point `latest` at it, then drop the previous one."""
    tensors, optimizer_meta = optimizer_tensors(optimizer)
    path = folder / f"epoch_{epoch:03d}.safetensors"
    meta = {**model_metadata(config), "epoch": epoch, "optimizer": optimizer_meta, "state": state}
    save_checkpoint(path, {**model.state_dict(), **tensors}, meta)
    mark_latest(path)
    previous = folder / f"epoch_{epoch - 1:03d}.safetensors"
    previous.unlink(missing_ok=True)
