"""The wire protocol between the coordinating center and the sites: every record and key name, the weights'
packing, and one typed builder and parser for each message and reply. Both sides use only this module.

Messages (Flower's Message API; `content` is a RecordDict):

| message | from | records |
|---|---|---|
| train | center | `arrays` (the global weights), `config` (`TrainInstruction`) |
| train reply | site | `arrays` (its trained weights), `metrics` (`TrainReport`), `site` (its name) |
| evaluate | center | `arrays`, `config` (`EvaluateInstruction`) |
| evaluate reply | site | `metrics` (exams, loss), `site` (name, `summary`: histograms, counts as JSON) |
| query | center | `config` (`QueryInstruction`: the evaluate one plus the pooled histograms) |
| query reply | site | `site` (name, `sums`: its placement sums as JSON) |

Flower adds `server-round` to every instruction it configures, and FedProx `proximal-mu`; SecAgg+ rounds
add `secagg-weight` (`SECAGG_WEIGHT`); central DP adds the mode (`CENTRAL_DP`) and, with client-side
clipping, Flower's clipping mods read their own keys.

The weights travel as one flat array with the list of their names (`pack_weights`): Flower moves every
array of a message as a separate object, and DenseNet's 700-odd tensors took 15× as long over TLS as one
array of the same bytes (140–210 s against 10–15 s an exchange with 3 sites on loopback).

In float32 (run config `transfer-dtype`, the default) a train reply holds the site's trained weights
(`WEIGHTS`). In half precision (`bfloat16` or `float16`, half the bytes each way) the center sends its
float32 master copy rounded, and a site replies with its update (`UPDATE`: trained − received weights,
small numbers that lose far less to rounding than the weights would), which the center decodes and adds
to its master copy in float32, so that rounding never accumulates over rounds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
"""Record names: the weights, the instruction, a reply's numbers, and the reply record that names the site
and holds what it sends."""
WEIGHTS = "weights"
"""The one Array of a message's ArrayRecord; the instruction's `weight-keys` names its parts, in order."""
UPDATE = "update"
"""A half-precision train reply's one Array: trained minus received weights, in the order of `WEIGHTS`."""
TRANSFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Run config `transfer-dtype` → the weights' type on the wire."""
_HALF = "fedmammo.raw"
"""The Array `stype` of half-precision values: their raw little-endian bytes (numpy has no bfloat16)."""
NAME, SUMMARY, SUMS = "name", "summary", "sums"
"""Keys of the `site` record."""
NUM_EXAMPLES = "num-examples"
"""The train metric by which Flower's strategies weight sites (FedAvg: by training exams)."""
SITE_WEIGHT = "site-weight"
"""The train metric (1 at every site) by which the center weights sites equally (`site-weighting = equal`,
or central DP, whose noise is calibrated to the plain mean of the clipped updates)."""
CENTRAL_DP = "central-dp"
"""The train instruction's key naming the center's central DP mode (the site clips for `client-*`)."""
SECAGG_WEIGHT = "secagg-weight"
"""The key SecAgg+ rounds add to the train instruction: the train metric by which SecAgg+ weights sites."""
SITE_MODEL = "model.safetensors"
"""In a site's run folder after the final evaluation: the global weights with the site's own state (its
BatchNorm layers under FedBN), a complete model that `fedmammo predict` reads."""
MODEL, LOCAL_ONLY, MODEL_BIRADS = "model", "local-only", "model-birads"
"""Rater names of the global model's scores, of the site's own model (trained on its data alone), and of
the global model's BI-RADS head (its most probable category, read like a radiologist's BI-RADS)."""
ALL = "all"
"""The group of all cases; subgroups are named COLUMN=VALUE (density=dense, symptoms=symptomatic)."""


class ProtocolError(ValueError):
    """A message or reply that lacks a record or key, or holds a value of the wrong type."""


def _key(name: str) -> str:
    return name.replace("_", "-")


_Record = TypeVar("_Record", bound="_Fields")


@dataclass(frozen=True, kw_only=True)
class _Fields:
    """A typed view of a ConfigRecord or MetricRecord: each field is the key with dashes for underscores.
    `extra` keeps the keys others add (Flower's `proximal-mu`, DP metrics) as they came."""

    extra: dict[str, Any] = field(default_factory=dict)
    WHAT: ClassVar[str] = "record"

    def values(self) -> dict[str, Any]:
        named = {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **named}

    @classmethod
    def parse(cls: type[_Record], record: Mapping[str, Any]) -> _Record:
        values, known = {}, set()
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            key = _key(f.name)
            known.add(key)
            if key not in record:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise ProtocolError(f"{cls.WHAT}: no {key!r}")
            values[f.name] = _typed(record[key], str(f.type), f"{cls.WHAT}: {key}")
        return cls(**values, extra={k: v for k, v in record.items() if k not in known})


def _typed(value: Any, kind: str, where: str) -> Any:
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "list[str]":
            if not isinstance(value, list | tuple):
                raise TypeError
            return [str(v) for v in value]
        return {"int": int, "float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise ProtocolError(f"{where} = {value!r}: expected {kind}") from None


@dataclass(frozen=True, kw_only=True)
class RunInstruction(_Fields):
    """What every instruction to a site says about the run."""

    fedmammo_config: str
    """The federation's config as TOML text, so that every site uses the same."""
    run_token: str
    """Names this run's folder at each site (its predictions, the state it keeps)."""
    weight_keys: list[str]
    """The state-dict names of the weights the center sends, in their order in the packed array."""
    server_round: int = 0
    """The round (0: before the first); Flower's strategy adds it to the train instructions it configures."""


@dataclass(frozen=True, kw_only=True)
class TrainInstruction(RunInstruction):
    local_epochs: int
    local_steps: int
    """Exactly this many batches when > 0, else `local_epochs` epochs."""
    num_server_rounds: int
    """The run's length: each round's place on the learning-rate schedule and the DP-SGD budget."""
    central_dp: str = "none"
    proximal_mu: float = 0.0
    """Added by FedProx."""
    secagg_weight: str = ""
    """Added in SecAgg+ rounds (`SECAGG_WEIGHT`): the train metric by which SecAgg+ weights the sites."""
    WHAT: ClassVar[str] = "train instruction"

    def record(self) -> ConfigRecord:
        """The ConfigRecord the strategy configures (it adds the round, and FedProx its mu)."""
        added = ("server-round", "proximal-mu", SECAGG_WEIGHT)
        return ConfigRecord({k: v for k, v in self.values().items() if k not in added})


@dataclass(frozen=True, kw_only=True)
class EvaluateInstruction(RunInstruction):
    stats_min_count: int = 1
    """Histogram cells merged until each holds 0 or >= this many cases of a class."""
    baseline_epochs: int = 0
    baseline_steps: int = 0
    """The local-only baseline's training budget; both 0: no baseline."""
    final: bool = False
    """The run's last evaluation: each site then keeps its complete model (`SITE_MODEL`)."""
    WHAT: ClassVar[str] = "evaluate instruction"

    def message(self, arrays: ArrayRecord) -> RecordDict:
        return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(self.values())})

    def query(self, pooled: str) -> QueryInstruction:
        """Exchange 2's instruction: this one with the pooled histograms (JSON)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return QueryInstruction(**fields, pooled=pooled)


@dataclass(frozen=True, kw_only=True)
class QueryInstruction(EvaluateInstruction):
    pooled: str = ""
    """The pooled histograms per group, as JSON (exchange 2 of the federated DeLong tests)."""
    WHAT: ClassVar[str] = "query instruction"

    def message(self, arrays: ArrayRecord | None = None) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord(self.values())})


@dataclass(frozen=True, kw_only=True)
class TrainReport(_Fields):
    """A train reply's metrics; `extra` holds what DP-SGD adds (`epsilon`, `delta`, `noise-multiplier`)."""

    num_examples: int
    loss: float
    steps: int
    seconds: float
    site_weight: float = 1.0
    WHAT: ClassVar[str] = "train reply"

    @property
    def epsilon(self) -> float | None:
        value = self.extra.get("epsilon")
        return None if value is None else float(value)


def instruction(msg: Message, kind: type[_Record]) -> _Record:
    """The instruction a site received, typed (a message without one is a ProtocolError)."""
    if CONFIG not in msg.content.config_records:
        raise ProtocolError(f"{kind.WHAT}: the message has no {CONFIG!r} record")
    return kind.parse(msg.content.config_records[CONFIG])


def site_record(name: str, **payload: Any) -> ConfigRecord:
    """The reply record naming the site; payloads (summary, sums) travel as JSON text."""
    return ConfigRecord({NAME: name, **{k: to_json(v) for k, v in payload.items()}})


def train_reply(msg: Message, site: str, arrays: ArrayRecord, report: TrainReport) -> Message:
    return Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(report.values()),
                               SITE: site_record(site)}), reply_to=msg)


def evaluate_reply(msg: Message, site: str, num_examples: int, loss: float, summary: Mapping[str, Any]
                   ) -> Message:
    return Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: num_examples, "loss": loss}),
                               SITE: site_record(site, **{SUMMARY: summary})}), reply_to=msg)


def query_reply(msg: Message, site: str, sums: Mapping[str, Any]) -> Message:
    return Message(RecordDict({SITE: site_record(site, **{SUMS: sums})}), reply_to=msg)


def site_name(reply: Message) -> str:
    """The name of the site that sent a reply (train, evaluate or query)."""
    try:
        return str(reply.content.config_records[SITE][NAME])
    except KeyError:
        raise ProtocolError(f"a reply from node {reply.metadata.src_node_id} does not name its site"
                            ) from None


def train_report(reply: Message) -> TrainReport:
    return TrainReport.parse(reply.content.metric_records[METRICS])


def site_payload(reply: Message, key: str) -> dict[str, Any]:
    """A site's JSON payload (`SUMMARY` or `SUMS`), decoded; an unreadable one names the site."""
    site = site_name(reply)
    try:
        return json.loads(str(reply.content.config_records[SITE][key]))
    except KeyError:
        raise ProtocolError(f"site {site}: the reply has no {key}") from None
    except ValueError as exc:
        raise ProtocolError(f"site {site}: unreadable {key}: {exc}") from None


def to_json(value: Any) -> str:
    """JSON with numpy arrays and numbers as lists and Python numbers (the statistics return numpy)."""
    return json.dumps(value, default=lambda o: o.tolist() if isinstance(o, np.ndarray | np.generic) else o)


def encode(values: torch.Tensor, dtype: str = "float32") -> Array:
    """A flat float32 tensor as one Array of `dtype` (a `TRANSFER_DTYPES` name), rounded to nearest."""
    if dtype == "float32":
        return Array(values.numpy())
    half = values.to(TRANSFER_DTYPES[dtype]).view(torch.int16).numpy().astype("<i2", copy=False)
    return Array(dtype=dtype, shape=(values.numel(),), stype=_HALF, data=half.tobytes())


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_values(array: Array) -> np.ndarray:
    """A numpy-serialised Array's values read where they lie, read-only: `Array.numpy` copies them (28 MB,
    ~8 ms, at the site and for each site at the center, every round). Numpy's own header readers."""
    buffer = io.BytesIO(array.data)  # shares the bytes until written to
    try:
        read_header = _NPY_HEADERS.get(np.lib.format.read_magic(buffer))
        if read_header is None:
            return array.numpy()
        shape, fortran, dtype = read_header(buffer)
        if any(size < 0 for size in shape):
            raise ValueError(f"shape {shape}")
        values = np.frombuffer(array.data, dtype, math.prod(shape), buffer.tell())
        return values.reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:
        raise ProtocolError(f"weights are not a readable numpy array: {exc}") from exc


def decode(array: Array) -> np.ndarray:
    """An Array written by `encode` as a flat float32 numpy array, read-only; anything else is a
    ProtocolError."""
    if array.stype != _HALF:
        if array.stype != SType.NUMPY:
            raise ProtocolError(f"weights are serialised as {array.stype!r}, expected {SType.NUMPY!r}")
        values = _npy_values(array)
        if values.dtype != np.float32 or values.ndim != 1:
            raise ProtocolError(f"weights are {values.dtype}{list(values.shape)}, expected one float32 array")
        return values
    if array.dtype not in TRANSFER_DTYPES or len(array.shape) != 1 or len(array.data) != 2 * array.shape[0]:
        raise ProtocolError(f"weights are {array.dtype}{list(array.shape)} in {len(array.data)} bytes, "
                            f"expected one array of {', '.join(TRANSFER_DTYPES)}")
    return torch.frombuffer(bytearray(array.data), dtype=TRANSFER_DTYPES[array.dtype]).float().numpy()


def _tensor(values: np.ndarray) -> torch.Tensor:
    """`decode`'s values as a tensor sharing their memory, to be read only (torch warns that it cannot mark a
    tensor read-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


def pack_weights(state: Mapping[str, torch.Tensor], keys: Sequence[str], dtype: str = "float32"
                 ) -> ArrayRecord:
    """The weights named `keys`, flattened into one Array of `dtype` (see the module docstring for why)."""
    flat = torch.cat([state[k].detach().reshape(-1).float().cpu() for k in keys])
    return ArrayRecord({WEIGHTS: encode(flat, dtype)})


def cast_weights(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """Packed float32 weights as sent in `dtype` (the same record for float32)."""
    if dtype == "float32":
        return arrays
    return ArrayRecord({WEIGHTS: encode(_tensor(decode(arrays[WEIGHTS])), dtype)})


def transfer_dtype(arrays: ArrayRecord) -> str:
    """The wire type of a message's weights (`TRANSFER_DTYPES`)."""
    return str(arrays[WEIGHTS].dtype)


def unpack_weights(arrays: ArrayRecord, keys: Sequence[str], like: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Inverse of `pack_weights`: the named tensors, shaped and typed like those of `like`. They may be views
    of the message's bytes: read them (copy them into a model), never change them in place."""
    if unknown := [k for k in keys if k not in like]:
        raise ProtocolError(f"the global weights do not fit this model (config mismatch): {unknown[:3]}")
    flat = _tensor(decode(arrays[WEIGHTS]))
    sizes = [like[k].numel() for k in keys]
    if sum(sizes) != flat.numel():
        raise ProtocolError(f"the global weights hold {flat.numel()} values; this model's {len(keys)} "
                            f"tensors hold {sum(sizes)} (config mismatch)")
    parts = flat.split(sizes)
    return {k: part.view(like[k].shape).to(like[k].dtype) for k, part in zip(keys, parts, strict=True)}
