"""Configuration of one site's data, model and training, read from a TOML file.

Every setting has a default, so a site can run with no file at all; a file only overrides what it names,
and an unknown section or key is an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    image_size: tuple[int, int] = (256, 192)
    """Height and width of each view after crop, aspect-kept resize and padding."""
    bilateral: bool = False
    """Also feed the contralateral breast's CC and MLO (asymmetry is a left–right comparison)."""
    decode_timeout_s: float = 120.0
    """A file whose decoding takes longer is rejected, so a run never hangs on one file."""
    workers: int = 0
    """Processes decoding DICOM in parallel; 0 = one per CPU core."""
    cache_dir: str | None = None
    """Where preprocessed views are cached; default: `<output>/cache`."""


@dataclass
class ModelConfig:
    norm: str = "batch"
    """`batch` (torchvision's DenseNet) or `group` (GroupNorm, needed for DP-SGD)."""
    pretrained: str | None = None
    """Local file with torchvision's ImageNet `densenet121` state dict; random init when unset."""
    memory_efficient: bool = False
    """DenseNet's checkpointed concatenation: less memory, more time (not with DP-SGD)."""
    dropout: float = 0.2
    birads_loss_weight: float = 0.3
    """Weight of the BI-RADS cross-entropy next to the malignancy loss."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-4
    lr_schedule: str = "constant"
    """`constant`, or `cosine`: lr · ½(1 + cos πt) for an epoch that starts at fraction t of the run's
    epochs (in a federated run: rounds × local epochs; `client.train.scheduled_lr`)."""
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    """`auto` (CUDA when present), `cuda`, `cuda:N` or `cpu`."""
    precision: str = "auto"
    """`auto` (bf16/fp16 autocast on CUDA, fp32 on CPU), `fp32`, `bf16` or `fp16`."""
    augment: bool = True
    balance: str = "pos_weight"
    """Class-imbalance handling: `pos_weight` (loss weight n_neg/n_pos), `sampler` or `none`."""
    threshold: float = 50.0
    """Malignancy score (0–100) at or above which an exam counts as positive."""
    num_threads: int = 0
    """CPU threads for torch; 0 = torch's default."""


@dataclass
class SynthConfig:
    """The synthetic multi-site cohort that `fedmammo synth` and the demo generate."""

    sites: int = 3
    train: list[int] = field(default_factory=lambda: [60, 60, 60])
    """Training exams per site."""
    val: list[int] | None = None
    """Validation exams per site; default: 15% of train, at least 4."""
    test: list[int] = field(default_factory=lambda: [40, 40, 40])
    seed: int = 0
    scale: float = 0.125
    """Matrix size relative to each vendor's real detector (1.0 = full size, ~20 MB a file)."""
    conspicuity: float = 1.0
    """Multiplies every lesion's contrast: the cohort's difficulty knob (docs/synthetic-data.md)."""


@dataclass
class PrivacyConfig:
    """Local differential privacy: DP-SGD with Opacus at every site (`client.dp`, docs/privacy.md)."""

    dp_sgd: bool = False
    """Train with DP-SGD: Poisson-sampled batches, each exam's gradient clipped, Gaussian noise added."""
    target_epsilon: float = 0.0
    """Each site's budget ε (at `delta`) for the whole run. With `noise_multiplier` 0 the noise is set so that
    the run's planned rounds spend exactly this; a site whose next round would exceed it stops training.
    0 = no limit (then `noise_multiplier` must be set)."""
    noise_multiplier: float = 0.0
    """Noise standard deviation over `max_grad_norm`; 0 = calibrated from `target_epsilon`."""
    max_grad_norm: float = 1.0
    """Each exam's gradient is clipped to this L2 norm."""
    delta: float = 1e-5
    """δ of the (ε, δ) guarantee; keep it well below 1 / (a site's training exams)."""
    physical_batch_size: int = 0
    """Run each (logical) batch of `train.batch_size` exams in chunks of at most this many (Opacus's
    BatchMemoryManager): large batches, which DP-SGD needs, in the memory of small ones; 0 = no chunks."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        if name == "image_size":
            if not (isinstance(value, list | tuple) and len(value) == 2 and all(int(v) >= 32 for v in value)):
                raise ValueError(f"{where}.image_size must be [height, width], each >= 32; got {value!r}")
            value = (int(value[0]), int(value[1]))
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    defaults = Config()
    parts = {
        name: _build(type(getattr(defaults, name)), values.get(name, {}), f"{source} [{name}]")
        for name in sections
    }
    config = Config(**parts)
    _check_privacy(config, source)
    return config


def _check_privacy(config: Config, source: str) -> None:
    """DP-SGD's requirements, checked when the config is read (at the server too, before any round)."""
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
        (p.target_epsilon < 0 or p.noise_multiplier < 0, "target_epsilon and noise_multiplier must be >= 0"),
        (p.target_epsilon == 0 and p.noise_multiplier == 0, "set target_epsilon or noise_multiplier"),
        (p.max_grad_norm <= 0, "max_grad_norm must be > 0"),
        (p.physical_batch_size < 0, "physical_batch_size must be >= 0"),
        (not 0 < p.delta < 1, "delta must be in (0, 1)"),
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
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read config: {exc}") from exc
    return config_from_dict(values, str(path))


def parse_config(text: str) -> Config:
    """The federation's config, sent by the server as TOML text so that every site uses the same."""
    return config_from_dict(tomllib.loads(text), "the federation's config")


def config_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as checkpoints and reports store it."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
