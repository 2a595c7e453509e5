"""Configuration of one site's data, model and training, read from a TOML file.

Every setting has a default, so a site can run with no file at all; a file only overrides what it names,
and an unknown section or key is an error (a typo must not silently fall back to a default).

Each key is a field below with its type, its rule (the allowed values or range, `_rule`) and a docstring
saying what it does and its unit. The whole file is checked when it is read (`config_from_dict`), at the
center too, before round 1: a wrong type, a value outside the allowed set or range, or a list of the wrong
length is one error naming the file, the section, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NORMS = ("batch", "group")
"""`model.norm`: torchvision's BatchNorm, or GroupNorm (per exam, as DP-SGD needs)."""
LR_SCHEDULES = ("constant", "cosine")
"""`train.lr_schedule`: the learning rate of every epoch (`client.train.scheduled_lr`)."""
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
"""`train.device`; `cuda:N` stands for a CUDA device index, N = 0, 1, …"""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""`train.precision`: autocast dtype (`client.device.resolve_runtime`)."""
BALANCES = ("pos_weight", "sampler", "none")
"""`train.balance`: class-imbalance handling (`client.data.pos_weight`, `client.data.epoch_order`)."""
GENERATED_2D = ("avoid", "prefer", "only")
"""`data.generated_2d`: which image fills a view when a study holds an acquired and a generated 2D image
(synthesized from tomosynthesis) of the same breast and projection (`common.exams.pair_exams`)."""
GPU_DECODE = ("auto", "on", "off")
"""`data.gpu_decode`: where compressed pixel data is decoded (`common.gpu_decoding.use_gpu`)."""


def _rule(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
          choices: tuple[str, ...] = (), low: float | None = None, high: float | None = None,
          open_low: bool = False, open_high: bool = False, one_per: str | None = None) -> Any:
    """A field with its default and the values it allows, checked by `_check` when a config is read:
    `choices` for strings; `low`/`high` (exclusive when `open_low`/`open_high`) for numbers, and for each
    element of a list; `one_per`: a list that must have as many elements as that field's value."""
    metadata = {"choices": choices, "low": low, "high": high, "open_low": open_low, "open_high": open_high,
                "one_per": one_per}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class DataConfig:
    """How a site's DICOM views become the model's input."""

    image_size: tuple[int, int] = _rule((256, 192), low=32)
    """Height and width in pixels of each view after crop, aspect-kept resize and padding; each >= 32 (the
    DenseNet trunk halves the size 5 times)."""
    bilateral: bool = _rule(False)
    """Also feed the contralateral breast's CC and MLO (asymmetry is a left–right comparison)."""
    decode_timeout_s: float = _rule(120.0, low=0, open_low=True)
    """Seconds one file's decoding may take; a slower file is rejected, so a run never hangs on one file."""
    workers: int = _rule(0, low=0)
    """Processes decoding DICOM in parallel (a count); 0 = one per CPU core."""
    gpu_decode: str = _rule("auto", choices=GPU_DECODE)
    """JPEG 2000 / HTJ2K / JPEG pixel data decoded on the GPU by nvImageCodec (`common.gpu_decoding`):
    `auto` when it is installed (extra `gpu-decode`) and a CUDA device is visible, `on` (an error
    otherwise), `off`."""
    loader_workers: int = _rule(-1, low=-1)
    """Processes reading cached views for the model (a count; `client.data.loader_workers`): 0 = in the
    training process; -1 = none on the CPU, up to 8 per GPU on CUDA."""
    cache_dir: str | None = _rule(None)
    """Folder (a path) where preprocessed views are cached; default: `<output>/cache`."""
    generated_2d: str = _rule("avoid", choices=GENERATED_2D)
    """Generated 2D views (Image Type value 4 GENERATED_2D: a synthesized 2D image such as C-View, made from
    the tomosynthesis) next to acquired ones of the same breast and projection: `avoid` keeps the acquired
    image, a generated one only where no acquired one exists; `prefer` keeps the generated one; `only`
    uses generated views alone and rejects acquired ones ("acquired 2D view")."""


@dataclass
class ModelConfig:
    """The dual-view DenseNet-121 and its loss (`common.model`)."""

    norm: str = _rule("batch", choices=NORMS)
    """Normalisation layers: `batch` (torchvision's DenseNet) or `group` (GroupNorm, needed for DP-SGD)."""
    pretrained: str | None = _rule(None)
    """Path of a local file with torchvision's ImageNet `densenet121` state dict; random init when unset."""
    memory_efficient: bool = _rule(False)
    """DenseNet's checkpointed concatenation: less memory, more time (not with DP-SGD)."""
    dropout: float = _rule(0.2, low=0, high=1, open_high=True)
    """Dropout probability (a fraction in [0, 1)) on the fused features, before both heads; 0 = none."""
    birads_loss_weight: float = _rule(0.3, low=0)
    """Weight (a factor >= 0) of the BI-RADS cross-entropy next to the malignancy loss (weight 1); 0 = the
    BI-RADS head is not trained."""


@dataclass
class TrainConfig:
    """Local training at each site (`client.train`)."""

    epochs: int = _rule(10, low=1)
    """Passes over the training exams (epochs) of a local run (`fedmammo train`), and the default number of
    rounds of `fedmammo demo` (a federated run's length is its `num-server-rounds`)."""
    batch_size: int = _rule(8, low=1)
    """Exams per optimiser step (the effective batch); with DP-SGD the expected size of the Poisson-sampled
    batch."""
    physical_batch_size: int = _rule(0, low=0)
    """Run each batch in chunks of at most this many exams per process, their gradients accumulated
    (Opacus's BatchMemoryManager with DP-SGD): a batch larger than a GPU's memory holds at once; 0 = whole
    batches."""
    lr: float = _rule(3e-4, low=0, open_low=True)
    """AdamW's learning rate (per step, > 0): every epoch's with `constant`, the peak of `cosine`."""
    lr_schedule: str = _rule("constant", choices=LR_SCHEDULES)
    """`constant`, or `cosine`: lr · ½(1 + cos πt) for an epoch that starts at fraction t of the run's
    epochs (in a federated run: rounds × local epochs; `client.train.scheduled_lr`)."""
    weight_decay: float = _rule(1e-4, low=0)
    """AdamW's decoupled weight decay coefficient (>= 0; each step shrinks the weights by lr × this)."""
    seed: int = _rule(0, low=0)
    """Seed (an integer >= 0) of the initial weights, the exams' order and the augmentation."""
    device: str = _rule("auto", choices=DEVICES)
    """`auto` (CUDA when present), `cuda`, `cuda:N` (the CUDA device of index N) or `cpu`."""
    precision: str = _rule("auto", choices=PRECISIONS)
    """`auto` (bf16/fp16 autocast on CUDA, fp32 on CPU), `fp32`, `bf16` or `fp16` (CUDA only)."""
    augment: bool = _rule(True)
    """Jitter the training views at random (rotation, scale, shift, gamma, contrast, noise: `client.data`)."""
    balance: str = _rule("pos_weight", choices=BALANCES)
    """Class-imbalance handling: `pos_weight` (loss weight n_neg/n_pos), `sampler` (each epoch draws benign
    and malignant exams equally often) or `none`."""
    threshold: float = _rule(50.0, low=0, high=100)
    """Malignancy score (on the 0–100 scale) at or above which an exam counts as positive."""
    num_threads: int = _rule(0, low=0)
    """CPU threads for torch (a count); 0 = torch's default."""
    processes: int = _rule(0, low=0)
    """Training processes at the site (DistributedDataParallel, one per GPU, started by the site's own
    command; `client.distributed`); 0 = one per visible CUDA device with `device` `auto`/`cuda`, else 1.
    On the CPU, N > 1 runs N processes over gloo (for testing)."""
    compile: bool = _rule(False)
    """Compile the model with `torch.compile` (faster steps on GPUs after a compilation of minutes)."""


@dataclass
class SynthConfig:
    """The synthetic multi-site cohort that `fedmammo synth` and the demo generate."""

    sites: int = _rule(3, low=1)
    """Number of synthetic hospitals, each with its own vendor; `train`, `val` and `test` give one count
    per site."""
    train: list[int] = _rule(factory=lambda: [60, 60, 60], low=0, one_per="sites")  # noqa: RUF009
    """Training exams per site (one count per site)."""
    val: list[int] | None = _rule(None, low=0, one_per="sites")  # noqa: RUF009
    """Validation exams per site (one count per site); default: 15% of train, at least 4."""
    test: list[int] = _rule(factory=lambda: [40, 40, 40], low=0, one_per="sites")  # noqa: RUF009
    """Test exams per site (one count per site)."""
    seed: int = _rule(0, low=0)
    """Seed (an integer >= 0) of the whole cohort: the same seed gives the same files."""
    scale: float = _rule(0.125, low=0, high=1, open_low=True)
    """Matrix size as a fraction (in (0, 1]) of each vendor's real detector (1.0 = full size, ~20 MB a
    file)."""
    conspicuity: float = _rule(1.0, low=0, open_low=True)
    """Factor (> 0) multiplying every lesion's contrast: the cohort's difficulty knob
    (docs/synthetic-data.md)."""


@dataclass
class PrivacyConfig:
    """Local differential privacy: DP-SGD with Opacus at every site (`client.dp`, docs/privacy.md)."""

    dp_sgd: bool = _rule(False)
    """Train with DP-SGD: Poisson-sampled batches, each exam's gradient clipped, Gaussian noise added."""
    target_epsilon: float = _rule(0.0, low=0)
    """Each site's budget ε (at `delta`, no unit) for the whole run. With `noise_multiplier` 0 the noise is
    set so that the run's planned rounds spend exactly this; a site whose next round would exceed it stops
    training. 0 = no limit (then `noise_multiplier` must be set)."""
    noise_multiplier: float = _rule(0.0, low=0)
    """Noise standard deviation as a multiple of `max_grad_norm`; 0 = calibrated from `target_epsilon`."""
    max_grad_norm: float = _rule(1.0, low=0, open_low=True)
    """Each exam's gradient is clipped to this L2 norm (> 0, in the gradient's units)."""
    delta: float = _rule(1e-5, low=0, high=1, open_low=True, open_high=True)
    """δ of the (ε, δ) guarantee, a probability in (0, 1); keep it well below 1 / (a site's training
    exams)."""


@dataclass
class Config:
    """The whole config: one section a dataclass, one TOML table a section."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """[data]: DICOM views → model input."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """[model]: the network and its loss."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """[train]: local training, the device and the positive threshold."""
    synth: SynthConfig = dataclasses.field(default_factory=SynthConfig)
    """[synth]: the synthetic cohort."""
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    """[privacy]: DP-SGD at the sites."""


_SINGULAR = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


class _Invalid(Exception):
    """A value that breaks its field's rule; the message says what is allowed."""


def _scalar(kind: type, value: Any) -> Any:
    """`value` as `kind`: a bool is never a number, an int is a float, a string is never a number."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _Invalid(f"expected {_SINGULAR[kind]}")
    return float(value) if kind is float else value


def _typed(hint: Any, value: Any) -> Any:
    """`value` checked against the type annotation `hint` (a scalar, `X | None`, `list[X]`,
    `tuple[X, ...]` of fixed length), converted to it (an int to a float, a list to a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None: TOML has no null, so None means "unset"
        return None if value is None else _typed(next(a for a in args if a is not type(None)), value)
    if origin in (list, tuple):
        kind = args[0]
        length = len(args) if origin is tuple else None
        noun = f"a list of {'' if length is None else f'{length} '}{_PLURAL[kind]}"
        if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
            raise _Invalid(f"expected {noun}")
        try:
            items = [_scalar(kind, v) for v in value]
        except _Invalid:
            raise _Invalid(f"expected {noun}") from None
        return origin(items)
    return _scalar(hint, value)


def _allowed(value: str, choices: tuple[str, ...]) -> bool:
    """`value` is one of `choices`, where a choice ending in `:N` stands for any index N."""
    return any(value == c or (c.endswith(":N") and re.fullmatch(re.escape(c[:-1]) + r"\d+", value))
               for c in choices)


def _check(value: Any, rule: dict[str, Any]) -> None:
    """`value` (already typed) against its field's `_rule`; a list's elements one by one."""
    if isinstance(value, str) and rule["choices"] and not _allowed(value, rule["choices"]):
        raise _Invalid(f"expected one of {', '.join(rule['choices'])}")
    numbers = [v for v in (value if isinstance(value, list | tuple) else [value])
               if isinstance(v, int | float) and not isinstance(v, bool)]
    each = "each " if isinstance(value, list | tuple) else ""
    if any(not math.isfinite(v) for v in numbers):
        raise _Invalid(f"{each}must be a finite number")
    low, high = rule["low"], rule["high"]
    bounds = " and ".join(bound for bound in (
        "" if low is None else f"{'>' if rule['open_low'] else '>='} {low:g}",
        "" if high is None else f"{'<' if rule['open_high'] else '<='} {high:g}",
    ) if bound)
    for v in numbers:
        too_low = low is not None and (v <= low if rule["open_low"] else v < low)
        too_high = high is not None and (v >= high if rule["open_high"] else v > high)
        if too_low or too_high:
            raise _Invalid(f"{each}must be {bounds}")


def _show(value: Any) -> str:
    """A value as the TOML file writes it: `true`, `'text'`, `[1, 2]`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return f"[{', '.join(_show(v) for v in value)}]"
    return repr(value)


MOVED = {("privacy", "physical_batch_size"): "train"}
"""Keys that moved to another section, (old section, key) -> new section: named in the error."""


def _build(cls: type, values: dict[str, Any], where: str, title: str) -> Any:
    """One section from its TOML table, every key typed and checked; `where` is "<file> [<title>]"."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        moved = "".join(f"; {key} is now in [{MOVED[title, key]}]"
                        for key in unknown if (title, key) in MOVED)
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}{moved}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        try:
            kwargs[name] = _typed(hints[name], value)
            _check(kwargs[name], known[name].metadata)
        except _Invalid as exc:
            raise ValueError(f"{where} {name} = {_show(value)}: {exc}") from None
    section = cls(**kwargs)
    for f in dataclasses.fields(cls):
        value, count_of = getattr(section, f.name), f.metadata["one_per"]
        if count_of and value is not None and len(value) != (count := getattr(section, count_of)):
            default = "" if f.name in values else " (the default)"
            raise ValueError(f"{where} {f.name} = {_show(value)}{default}: expected {count} "
                             f"value{'s' * (count != 1)}, one per site ({count_of} = {count})")
    return section


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """A config from parsed TOML (or `config_dict`'s JSON), checked as a whole; `source` names it in errors
    (the file's path)."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    for name, table in values.items():
        if not isinstance(table, dict):
            raise ValueError(f"{source}: {name} = {_show(table)}: expected a [{name}] section (a TOML table)")
    hints = typing.get_type_hints(Config)
    config = Config(**{name: _build(hints[name], values.get(name, {}), f"{source} [{name}]", name)
                       for name in sections})
    _check_privacy(config, source)
    return config


def _check_privacy(config: Config, source: str) -> None:
    """DP-SGD's requirements, checked when the config is read (at the server too, before any round). The
    privacy keys' own ranges are their fields' rules."""
    p = config.privacy
    if not p.dp_sgd:
        return
    problems = [message for failed, message in (
        (config.model.norm != "group", "model.norm must be 'group': BatchNorm mixes the exams of a batch, so "
                                       "one exam's gradient cannot be clipped on its own"),
        (config.model.memory_efficient, "model.memory_efficient must be false (checkpointing breaks Opacus's "
                                        "per-sample gradients)"),
        (config.train.precision == "fp16", "train.precision 'fp16' is not supported (use bf16 or fp32)"),
        (config.train.balance == "sampler", "train.balance 'sampler' draws exams by class, which the "
                                            "accountant's Poisson sampling does not allow: use pos_weight"),
        (p.target_epsilon == 0 and p.noise_multiplier == 0, "set target_epsilon or noise_multiplier"),
    ) if failed]
    if problems:
        raise ValueError(f"{source} [privacy] dp_sgd = true: " + "; ".join(problems))


def load_config(path: str | Path | None) -> Config:
    """Read a TOML config; `None` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read config: {exc}") from exc
    return config_from_dict(values, str(path))


def parse_config(text: str, source: str = "the federation's config") -> Config:
    """The federation's config, sent by the server as TOML text so that every site uses the same; `source`
    names it in errors (the center passes its file's path)."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: cannot read config: {exc}") from exc
    return config_from_dict(values, source)


def config_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as checkpoints and reports store it."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flat_config(config: Config) -> dict[str, Any]:
    """The config as `section.key` → value."""
    return {f"{section}.{key}": value for section, values in config_dict(config).items()
            for key, value in values.items()}
