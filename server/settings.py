"""The run's settings: the run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`),
typed and checked as a whole before round 1, with the federation's fedmammo config it names.

Each key is a field of `Settings` with its type, its rule (allowed values or range) and a docstring; a wrong
type, an unknown value or an out-of-range number is one error naming the key and what is allowed, and so
is a combination that would void a privacy guarantee (central DP, SecAgg+, DP-SGD).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import Config
from common.protocol import TRANSFER_DTYPES as PROTOCOL_DTYPES
from common.sites import absolute_path
from server.console import APP_DIR

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "trimmed-mean", "median", "krum")
"""Flower strategies a run may use (`server.strategy` builds them)."""
BATCHNORM = ("average", "local")
"""BatchNorm layers averaged like every weight, or kept at each site (FedBN, Li et al. 2021)."""
SITE_WEIGHTING = ("examples", "equal")
"""Sites weighted in the mean by their training exams (FedAvg), or each the same whatever its size."""
CENTRAL_DP_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
"""Central DP: Flower's wrappers, clipping at the center or at the sites (`server.privacy`)."""
SECURE_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose aggregate is the weighted mean SecAgg+ computes; the others need single updates."""
SECAGG_CENTRAL_DP = "client-fixed"
"""The central DP mode SecAgg+ combines with: each site clips its update before masking it, and the center
adds the noise to the unmasked mean (`server.secagg`)."""
TRANSFER_DTYPES = tuple(PROTOCOL_DTYPES)
"""The weights' type on the wire, both ways (`common.protocol`): float32, or half the bytes."""
RESUMABLE = frozenset({"num-server-rounds", "round-timeout", "node-wait-timeout", "eval-every", "baselines",
                       "stats-min-count", "resume"})
"""Run-config keys that may change when a run is resumed: they do not change the trained weights
(`num-server-rounds` only where no schedule depends on it: `common.checkpoint.resume_problems`)."""


def app_defaults(app: Path = APP_DIR) -> dict[str, Any]:
    """The run config's keys and defaults, `[tool.flwr.app.config]` of the app's pyproject."""
    return tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _rule(key: str | None = None, *, choices: tuple[str, ...] = (), low: float | None = None,
          high: float | None = None, open_low: bool = False, open_high: bool = False) -> Any:
    """A field's run-config key (default: the field's name with dashes) and the values it allows."""
    return dataclasses.field(metadata={"key": key, "choices": choices, "low": low, "high": high,
                                       "open_low": open_low, "open_high": open_high})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run config, checked. Durations are seconds; counts are sites, rounds, epochs or batches."""

    config_path: Path = _rule("config")  # noqa: RUF009 (a field spec)
    """The fedmammo TOML ([data], [model], [train], [privacy]) every site uses; relative to the app folder."""
    rounds: int = _rule("num-server-rounds", low=1)
    """Federated rounds: each samples sites, trains them locally and aggregates their weights."""
    local_epochs: int = _rule(low=0)
    """Local epochs over a site's training exams per round (when `local-steps` is 0)."""
    local_steps: int = _rule(low=0)
    """Exactly this many local batches per round when > 0 (then `local-epochs` is not used)."""
    strategy: str = _rule(choices=STRATEGIES)
    """The aggregation: FedAvg, FedProx, FedAdam, FedAvgM, trimmed mean, median or Krum."""
    proximal_mu: float = _rule(low=0)
    """FedProx's proximal term weight (strategy fedprox)."""
    server_lr: float = _rule(low=0)
    """FedAdam's / FedAvgM's server learning rate; 0 keeps Flower's default."""
    server_momentum: float = _rule(low=0, high=1, open_high=True)
    """FedAvgM's server momentum."""
    trim_beta: float = _rule(low=0, high=0.5, open_high=True)
    """Trimmed mean: the fraction of values cut at each end."""
    krum_malicious: int = _rule(low=0)
    """Krum: the number of malicious sites tolerated."""
    batchnorm: str = _rule(choices=BATCHNORM)
    """`average`: BatchNorm layers are averaged; `local`: they stay at each site (FedBN)."""
    site_weighting: str = _rule(choices=SITE_WEIGHTING)
    """`examples`: sites weighted by training exams (FedAvg); `equal`: each site the same."""
    min_nodes: int = _rule(low=1)
    """Sites needed to start a round, and replies needed to complete it."""
    fraction_train: float = _rule(low=0, high=1, open_low=True)
    """Fraction of the connected sites sampled each round."""
    round_timeout: float = _rule(low=0, open_low=True)
    """Seconds to wait for the sites' replies; a later site is missing from the round."""
    node_wait_timeout: float = _rule(low=0, open_low=True)
    """Seconds to wait for `min-nodes` sites to connect."""
    eval_every: int = _rule(low=0)
    """Federated evaluation every k rounds; 0: only at the end."""
    baselines: bool = _rule()
    """Each site also trains a local-only model, compared with the federated one at the end."""
    stats_min_count: int = _rule(low=1)
    """Histogram cells merged until each holds 0 or at least this many cases of a class."""
    data_root: str = _rule()
    """Simulation: the folder of site folders (virtual node i reads the i-th, sorted); read by the sites."""
    out: Path = _rule("out-dir")  # noqa: RUF009 (a field spec)
    """The center's output folder (checkpoints, metrics.csv, report/); absolute."""
    resume: bool = _rule()
    """Continue the run in `out-dir` from its last complete round."""
    max_update_norm: float = _rule(low=0)
    """Reject a site's update whose L2 distance to the global weights exceeds this; 0: no cap."""
    update_norm_factor: float = _rule(low=0)
    """... or exceeds this many times the other sites' median distance; 0: off."""
    secagg: bool = _rule()
    """Secure aggregation (SecAgg+, at least 3 sites): the center sees only the mean update."""
    secagg_clipping_range: float = _rule(low=0, open_low=True)
    """SecAgg+: each update value times the site's weight share is clipped to ± this."""
    secagg_max_weight: float = _rule(low=0, open_low=True)
    """SecAgg+: the largest site weight (training exams); a site's share is its weight over this."""
    central_dp: str = _rule(choices=CENTRAL_DP_MODES)
    """Central DP mode (`server.privacy`); `none`: off."""
    dp_noise_multiplier: float = _rule(low=0)
    """Central DP: noise standard deviation over the clipping norm."""
    dp_clipping_norm: float = _rule(low=0)
    """Central DP: L2 bound of a site's update (the initial one when adaptive)."""
    dp_sampled_sites: int = _rule(low=0)
    """Central DP: sites sampled each round (must match what the strategy samples)."""
    dp_delta: float = _rule(low=0, high=1)
    """Central DP: δ of the reported (ε, δ)."""
    dp_clipped_count_stddev: float = _rule(low=0)
    """Adaptive central DP: noise on the count of clipped updates; 0: sampled sites / 20."""
    transfer_dtype: str = _rule(choices=TRANSFER_DTYPES)
    """The weights on the wire: `float32`, or `bfloat16` / `float16` (global weights out, updates back, half
    the bytes; the center keeps and aggregates float32)."""

    @classmethod
    def from_run_config(cls, run: Mapping[str, Any]) -> Settings:
        """Read and check every key; a wrong key, type or value is one error naming the key."""
        fields = {key(f): f for f in dataclasses.fields(cls)}
        if unknown := sorted(set(run) - set(fields)):
            raise ValueError(f"run config: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        values = {f.name: _value(k, run.get(k), f) for k, f in fields.items()}
        config = Path(values["config_path"])
        values["config_path"] = config if config.is_absolute() else APP_DIR / config
        values["out"] = absolute_path(run, "out-dir", "run config")
        settings = cls(**values)
        if problems := settings.problems():
            raise ValueError("run config: " + "; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        """What the keys allow one by one but not together (empty when fine)."""
        s = self
        problems = [message for failed, message in (
            (s.local_epochs < 1 and s.local_steps < 1, "local-epochs or local-steps must be at least 1"),
            (not s.config_path.is_file(), f"config: {s.config_path} does not exist"),
        ) if failed]
        if s.central_dp != "none":
            problems += [message for failed, message in (
                (s.dp_noise_multiplier <= 0, "dp-noise-multiplier must be > 0 with central DP"),
                (s.dp_clipping_norm <= 0, "dp-clipping-norm must be > 0 with central DP"),
                (s.dp_sampled_sites < 1, "dp-sampled-sites must be the number of sites sampled each round"),
                (not 0 < s.dp_delta < 1, "dp-delta must be in (0, 1) with central DP"),
            ) if failed]
        if s.secagg:
            problems += [message for failed, message in (
                (s.min_nodes < 3, "secagg needs min-nodes >= 3: with 2 sites each could subtract its own "
                                  "update from the sum and read the other's"),
                (s.strategy not in SECURE_STRATEGIES, f"secagg computes the weighted mean: strategy "
                                                      f"{s.strategy!r} needs single updates; use "
                                                      f"{' or '.join(SECURE_STRATEGIES)}"),
                (s.central_dp not in ("none", SECAGG_CENTRAL_DP),
                 f"secagg combines only with central-dp = {SECAGG_CENTRAL_DP!r}: the center cannot clip "
                 "updates it never sees"),
                (s.transfer_dtype != "float32",
                 f"secagg with transfer-dtype = {s.transfer_dtype!r}: SecAgg+ sends each update in its own "
                 "encoding (quantized to 2^24 levels, masked integers of 8 bytes a weight); use "
                 "transfer-dtype = \"float32\""),
            ) if failed]
        return problems

    def config_problems(self, config: Config) -> list[str]:
        """What in the federation's fedmammo config, with these settings, would void DP (empty when fine)."""
        s = self
        return [message for failed, message in (
            (config.privacy.dp_sgd and s.strategy == "fedprox" and s.proximal_mu > 0,
             "DP-SGD ([privacy] dp_sgd) with fedprox: the proximal term's gradient would bypass per-exam "
             "clipping; use fedavg"),
            (config.privacy.dp_sgd and s.baselines,
             "DP-SGD ([privacy] dp_sgd) with baselines = true: the local-only baselines would train without "
             "DP and their test scores leave the sites; set baselines = false"),
            (s.central_dp != "none" and config.model.norm == "batch" and s.batchnorm == "average",
             "central DP adds noise to every weight sent, BatchNorm's running variances included, which can "
             "turn negative: use [model] norm = \"group\" or batchnorm = \"local\""),
        ) if failed]


def key(field: dataclasses.Field) -> str:
    """A Settings field's run-config key."""
    return field.metadata["key"] or field.name.replace("_", "-")


def _value(name: str, value: Any, field: dataclasses.Field) -> Any:
    kind = {"Path": str, "int": int, "float": float, "str": str, "bool": bool}[str(field.type)]
    rule = field.metadata
    noun = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]
    number = kind in (int, float)
    if value is None:
        raise ValueError(f"run config: {name} is missing: expected {noun}")
    wrong = (isinstance(value, bool) != (kind is bool) or (number and not isinstance(value, int | float))
             or (kind is str and not isinstance(value, str)))
    if wrong or (kind is int and not float(value).is_integer()):
        raise ValueError(f"run config: {name} = {value!r}: expected {noun}")
    value = kind(value)
    if rule["choices"] and value not in rule["choices"]:
        raise ValueError(f"run config: {name} = {value!r}: expected one of {', '.join(rule['choices'])}")
    if number:
        low, high = rule["low"], rule["high"]
        too_low = low is not None and (value <= low if rule["open_low"] else value < low)
        too_high = high is not None and (value >= high if rule["open_high"] else value > high)
        if too_low or too_high or not math.isfinite(value):
            lower = "" if low is None else f"{'>' if rule['open_low'] else '>='} {low:g}"
            upper = "" if high is None else f"{'<' if rule['open_high'] else '<='} {high:g}"
            bounds = " and ".join(b for b in (lower, upper) if b)
            raise ValueError(f"run config: {name} = {value!r}: must be {bounds}")
    return value
