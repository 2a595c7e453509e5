"""The ClientApp: what runs at a hospital during a federated run (Flower's Message API).

- train: the global weights in; local training on the site's train split (local epochs or steps, and
  FedProx's proximal term, as the server's message says); the trained weights and the loss out.
- evaluate: the global model scores the site's test split. The per-exam predictions are written to the
  site's own output folder for the hospital to audit and never leave it; the reply holds the site's loss,
  its exam counts, the per-class score histograms, the 2×2 tables of every pair of raters' calls and the
  BI-RADS head's confusion matrix that the federated statistics pool.
- query: the second exchange of the federated DeLong tests: given the pooled histograms, sums over the
  site's cases, read back from its prediction file.

Messages and replies are built and read by `common.protocol`, the one place that knows the wire format.
Weights the server does not send stay at the site (the BatchNorm layers with FedBN), kept per run and round
in the site's output folder so that a resumed run finds them; BatchNorm's step counters, which torch never
reads where a layer has a momentum, are not kept (`common.model.unused_entries`). A process lends one model
per message in progress and reuses it for the next (`_lent_model`), every entry of its state overwritten.
A site's data folder, output folder and name come from its SuperNode's node config (`data-path`,
`output-path`, `site-name`); in simulation virtual node i is the i-th site folder of the run config's
`data-root`, with its output in `out-dir`/sites/NAME.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from client.clipping import clipping_mod
from client.data import ExamSet, exam_set
from client.evaluate import evaluate as score_exams
from client.evaluate import predict
from client.prepare import PreparedSite, prepare_site
from client.redact import redact
from client.secagg import secagg_mod
from client.site_stats import cases_csv, histograms, placement_sums, read_cases, site_counts
from client.train import planned_steps, train_epochs
from client.transfer import transfer_mod
from common.atomic import write_atomic
from common.checkpoint import load_checkpoint, model_metadata, save_checkpoint
from common.config import Config, parse_config
from common.model import build_model, initial_model, unused_entries
from common.protocol import (
    ARRAYS,
    LOCAL_ONLY,
    MODEL,
    SITE_MODEL,
    WEIGHTS,
    EvaluateInstruction,
    QueryInstruction,
    RunInstruction,
    TrainInstruction,
    TrainReport,
    evaluate_reply,
    instruction,
    pack_weights,
    query_reply,
    train_reply,
    unpack_weights,
)
from common.runtime import seed_everything, set_threads
from common.sites import absolute_path, site_folders

app = ClientApp()


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    data: Path
    out: Path


def resolve_site(context: Context) -> Site:
    node, run = context.node_config, context.run_config
    if "partition-id" not in node:  # a deployed SuperNode
        data = absolute_path(node, "data-path", "SuperNode node config")
        out = absolute_path(node, "output-path", "SuperNode node config")
        return Site(str(node.get("site-name") or data.name), data, out)
    root = absolute_path(run, "data-root", "simulation: run config")
    folders = site_folders(root)
    if len(folders) != int(node["num-partitions"]):
        raise ValueError(f"{root} has {len(folders)} site folders with a labels.csv, but the simulation has "
                         f"{node['num-partitions']} SuperNodes")
    data = folders[int(node["partition-id"])]
    return Site(data.name, data, absolute_path(run, "out-dir", "run config") / "sites" / data.name)


@functools.lru_cache(maxsize=8)  # simulation reuses its worker processes across rounds: read a site once
def _prepared(data: Path, config_toml: str, cache: Path) -> PreparedSite:
    return prepare_site(data, parse_config(config_toml), cache_dir=cache, progress=False)


@dataclasses.dataclass
class _Job:
    """One message's site, typed instruction and config, and this run's folder at the site."""

    site: Site
    task: RunInstruction
    config: Config
    folder: Path

    @classmethod
    def of(cls, msg: Message, context: Context, kind: type[RunInstruction]) -> _Job:
        site = resolve_site(context)
        task = instruction(msg, kind)
        config = parse_config(task.fedmammo_config)
        set_threads(config.train.num_threads)
        return cls(site, task, config, site.out / "runs" / task.run_token)

    @property
    def round(self) -> int:
        return self.task.server_round

    def prepared(self) -> PreparedSite:
        cache = Path(self.config.data.cache_dir or self.site.out / "cache")
        return _prepared(self.site.data, self.task.fedmammo_config, cache)

    def seed(self, server_round: int) -> torch.Generator:
        return seed_everything(self.config.train.seed, server_round, zlib.crc32(self.site.name.encode()))

    def predictions(self) -> Path:
        return self.folder / "predictions" / f"round-{self.round:04d}.csv"


def _named(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Errors name the site: the server logs the reply's error, and node ids mean nothing to people. The
    reply holds the error's text redacted (`client.redact`): it may quote patient data."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            try:
                name = resolve_site(context).name
            except ValueError:
                name = f"node {context.node_id}"
            raise RuntimeError(f"site {name}: {redact(str(exc))}") from exc  # the site's log has it all

    return wrapper


@functools.lru_cache(maxsize=2)
def _model_template(config_toml: str) -> nn.Module:
    """The model's structure and initial state, built once per process: DenseNet-121's initialisation costs
    ~0.5 s, and a simulation reuses its worker processes for every message."""
    config = parse_config(config_toml)
    return build_model(dataclasses.replace(config.model, pretrained=None), config.data.bilateral)


@functools.lru_cache(maxsize=2)
def _template_state(config_toml: str) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """The template's state dict (read only: the template is never trained) and its `unused_entries`."""
    template = _model_template(config_toml)
    return template.state_dict(), frozenset(unused_entries(template))


_free_models: dict[str, list[nn.Module]] = {}
_free_lock = threading.Lock()


@contextlib.contextmanager
def _lent_model(config_toml: str) -> Iterator[nn.Module]:
    """A model of the config's structure for one message: one the process lent before and got back, or a
    copy of the template. A copy per message cost ~70 ms of a simulated round; every entry of a lent model's
    state is overwritten by `_global_model`, so nothing of one site's message reaches the next. A message
    that fails does not give its model back (it may hold anything)."""
    with _free_lock:
        for other in [key for key in _free_models if key != config_toml]:
            del _free_models[other]  # a worker that serves a new run lets the last run's models go
        free = _free_models.setdefault(config_toml, [])
        model = free.pop() if free else None
    if model is None:
        model = copy.deepcopy(_model_template(config_toml))
    yield model
    model.zero_grad(set_to_none=True)
    with _free_lock:
        free.append(model)


def _global_model(model: nn.Module, msg: Message, job: _Job, last_round: int) -> nn.Module:
    """`model` holding the global weights, this site's own kept state (`_kept_state`) for what the server
    does not send, and the template's for the rest (BatchNorm's unused step counters)."""
    like, _ = _template_state(job.task.fedmammo_config)
    kept = [p for p in sorted(job.folder.glob("local-state/round-*.safetensors"))
            if int(p.stem.removeprefix("round-")) <= last_round]
    local = load_checkpoint(kept[-1]).tensors if kept else {}
    if wrong := [k for k, v in local.items() if k not in like or v.shape != like[k].shape]:
        raise ValueError(f"{kept[-1]}: this site's kept state does not fit the model: {wrong[:3]}")
    given = {**like, **local, **unpack_weights(msg.content[ARRAYS], job.task.weight_keys, like)}
    with torch.no_grad():  # shapes match by construction: a copy per tensor, not load_state_dict's checks
        for name, tensor in model.state_dict().items():
            tensor.copy_(given[name])
    return model


def _kept_state(state: dict[str, torch.Tensor], job: _Job) -> dict[str, torch.Tensor]:
    """What the site keeps of its trained model's `state` for its next round: the entries the server does
    not average (FedBN's BatchNorm layers), except BatchNorm's step counters where torch never reads them."""
    _, unused = _template_state(job.task.fedmammo_config)
    skip = unused.union(job.task.weight_keys)
    return {k: v for k, v in state.items() if k not in skip}


@app.train(mods=[secagg_mod(WEIGHTS), transfer_mod, clipping_mod])
@_named
def train(msg: Message, context: Context) -> Message:
    job = _Job.of(msg, context, TrainInstruction)
    task: TrainInstruction = job.task  # type: ignore[assignment]
    data = exam_set([job.prepared()], "train")
    with _lent_model(task.fedmammo_config) as model:
        return _train(msg, job, task, data, _global_model(model, msg, job, job.round - 1))


def _train(msg: Message, job: _Job, task: TrainInstruction, data: ExamSet, model: nn.Module) -> Message:
    epochs, steps = task.local_epochs, task.local_steps or None
    private = None
    if job.config.privacy.dp_sgd:  # raises BudgetSpent, and the site sits the round out, once it is spent
        from client.dp import PrivateSGD  # here: opacus takes seconds to import, paid by every message

        private = PrivateSGD.for_round(job.folder, job.round, job.config, len(data),
                                       planned_steps(len(data), job.config.train.batch_size, epochs, steps),
                                       task.num_server_rounds)
    per_round = 1 if steps else epochs  # the round's place on the learning-rate schedule
    anchor = ({k: v.detach().clone() for k, v in model.named_parameters()} if task.proximal_mu > 0
              else None)  # FedProx's reference: a copy of every weight, only where it is used
    stats = train_epochs(model, data, job.config, epochs=epochs, steps=steps, generator=job.seed(job.round),
                         global_weights=anchor, mu=task.proximal_mu, progress=False, private=private,
                         position=((job.round - 1) * per_round, task.num_server_rounds * per_round))
    state = model.state_dict()
    if kept := _kept_state(state, job):
        save_checkpoint(job.folder / "local-state" / f"round-{job.round:04d}.safetensors", kept,
                        {"site": job.site.name, "round": job.round})
    if private is not None:
        private.save(job.folder, job.round)
    report = TrainReport(num_examples=len(data), loss=stats.loss, steps=stats.steps, seconds=stats.seconds,
                         extra=private.metrics() if private else {})
    return train_reply(msg, job.site.name, pack_weights(state, task.weight_keys), report)


def _local_only_model(job: _Job, task: EvaluateInstruction) -> nn.Module:
    """The site's baseline: the run's initial model trained on this site's data alone, for as long as a
    site trains in the whole federated run. Kept in the run folder, so it is trained once."""
    budget = {"epochs": task.baseline_epochs, "steps": task.baseline_steps}
    path = job.folder / "local-only.safetensors"
    model = initial_model(job.config)
    if path.is_file() and (stored := load_checkpoint(path)).metadata.get("budget") == budget:
        model.load_state_dict(stored.tensors)
        return model
    train_epochs(model, exam_set([job.prepared()], "train"), job.config, epochs=budget["epochs"],
                 steps=budget["steps"] or None, generator=job.seed(0), progress=False)
    save_checkpoint(path, model.state_dict(), {"site": job.site.name, "budget": budget})
    return model


@app.evaluate()
@_named
def evaluate(msg: Message, context: Context) -> Message:
    job = _Job.of(msg, context, EvaluateInstruction)
    task: EvaluateInstruction = job.task  # type: ignore[assignment]
    prepared = job.prepared()
    test = exam_set([prepared], "test")
    with _lent_model(task.fedmammo_config) as model:
        _global_model(model, msg, job, job.round)
        if task.final:  # the site's complete model: with FedBN no other holds its BatchNorm layers
            save_checkpoint(job.folder / SITE_MODEL, model.state_dict(),
                            {**model_metadata(job.config), "site": job.site.name, "round": job.round,
                             "run-token": job.task.run_token})
        metrics, predictions = score_exams(model, test, job.config)
    scores = {MODEL: predictions.score}
    if task.baseline_epochs or task.baseline_steps:
        scores[LOCAL_ONLY] = predict(_local_only_model(job, task), test, job.config).score
    write_atomic(job.predictions(), cases_csv(prepared.split("test").labels, predictions.birads, scores))
    cases = read_cases(job.predictions(), job.config.train.threshold)
    summary = {
        "site": job.site.name,
        "loss": metrics.loss,
        "birads_accuracy": metrics.birads_accuracy,
        "counts": site_counts(prepared.labels),
        "raters": {name: {"kind": r.kind, "threshold": r.threshold} for name, r in cases.raters.items()},
        "skipped": cases.skipped,
        "groups": histograms(cases, task.stats_min_count),
    }
    return evaluate_reply(msg, job.site.name, len(test), metrics.loss, summary)


@app.query()
@_named
def query(msg: Message, context: Context) -> Message:
    """Exchange 2 of the federated DeLong tests: the pooled histograms in, placement sums out."""
    job = _Job.of(msg, context, QueryInstruction)
    task: QueryInstruction = job.task  # type: ignore[assignment]
    cases = read_cases(job.predictions(), job.config.train.threshold)
    sums = placement_sums(cases, json.loads(task.pooled), task.stats_min_count)
    return query_reply(msg, job.site.name, sums)
