"""The fedmammo config: every key typed, documented and checked when the file is read (`common.config`)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import tomllib
import typing
from pathlib import Path

import pytest

from common import config as config_module
from common.config import (
    BALANCES,
    DEVICES,
    LR_SCHEDULES,
    NORMS,
    PRECISIONS,
    Config,
    config_dict,
    config_from_dict,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _error(tmp_path: Path, toml: str) -> tuple[Path, str]:
    """The one-line error that reading `toml` as a file gives."""
    path = tmp_path / "site.toml"
    path.write_text(toml)
    with pytest.raises(ValueError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    return path, message


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        # a wrong type
        ("data", 'workers = "two"', "workers = 'two': expected an integer"),
        ("train", 'lr = "1e-3"', "lr = '1e-3': expected a number"),
        ("train", "batch_size = 8.0", "batch_size = 8.0: expected an integer"),
        ("train", "augment = 1", "augment = 1: expected true or false"),
        ("model", "norm = 1", "norm = 1: expected a string"),
        ("data", "cache_dir = 3", "cache_dir = 3: expected a string"),
        ("data", "image_size = 64", "image_size = 64: expected a list of 2 integers"),
        # a bool where a number is expected
        ("train", "epochs = true", "epochs = true: expected an integer"),
        ("train", "threshold = false", "threshold = false: expected a number"),
        # a value outside the allowed set
        ("train", 'balance = "smote"', "balance = 'smote': expected one of pos_weight, sampler, none"),
        ("train", 'lr_schedule = "step"', "lr_schedule = 'step': expected one of constant, cosine"),
        ("train", 'precision = "fp64"', "precision = 'fp64': expected one of auto, fp32, bf16, fp16"),
        ("train", 'device = "gpu"', "device = 'gpu': expected one of auto, cpu, cuda, cuda:N"),
        ("train", 'device = "cuda:x"', "device = 'cuda:x': expected one of auto, cpu, cuda, cuda:N"),
        ("model", 'norm = "layer"', "norm = 'layer': expected one of batch, group"),
        # a number out of range
        ("train", "batch_size = 0", "batch_size = 0: must be >= 1"),
        ("train", "epochs = 0", "epochs = 0: must be >= 1"),
        ("train", "lr = 0", "lr = 0: must be > 0"),
        ("train", "weight_decay = -1e-4", "weight_decay = -0.0001: must be >= 0"),
        ("train", "threshold = 101", "threshold = 101: must be >= 0 and <= 100"),
        ("train", "threshold = nan", "threshold = nan: must be a finite number"),
        ("train", "seed = -1", "seed = -1: must be >= 0"),
        ("train", "num_threads = -2", "num_threads = -2: must be >= 0"),
        ("model", "dropout = 1.0", "dropout = 1.0: must be >= 0 and < 1"),
        ("model", "birads_loss_weight = -0.1", "birads_loss_weight = -0.1: must be >= 0"),
        ("data", "decode_timeout_s = 0", "decode_timeout_s = 0: must be > 0"),
        ("data", "workers = -1", "workers = -1: must be >= 0"),
        ("data", "image_size = [16, 64]", "image_size = [16, 64]: each must be >= 32"),
        ("synth", "sites = 0", "sites = 0: must be >= 1"),
        ("synth", "scale = 1.5", "scale = 1.5: must be > 0 and <= 1"),
        ("synth", "conspicuity = 0", "conspicuity = 0: must be > 0"),
        ("synth", "test = [40, -1, 40]", "test = [40, -1, 40]: each must be >= 0"),
        ("privacy", "delta = 1", "delta = 1: must be > 0 and < 1"),
        ("privacy", "max_grad_norm = 0", "max_grad_norm = 0: must be > 0"),
        ("privacy", "target_epsilon = -1", "target_epsilon = -1: must be >= 0"),
        ("train", "physical_batch_size = -1", "physical_batch_size = -1: must be >= 0"),
        ("data", "loader_workers = -2", "loader_workers = -2: must be >= -1"),
        # a list's elements
        ("synth", 'train = [60, "60", 60]', "train = [60, '60', 60]: expected a list of integers"),
        ("synth", "val = [4, 4.5, 4]", "val = [4, 4.5, 4]: expected a list of integers"),
        ("data", "image_size = [64.0, 64]", "image_size = [64.0, 64]: expected a list of 2 integers"),
        ("data", "image_size = [true, 64]", "image_size = [true, 64]: expected a list of 2 integers"),
        # a list of the wrong length
        ("data", "image_size = [64, 64, 64]", "image_size = [64, 64, 64]: expected a list of 2 integers"),
        ("synth", "test = [40, 40]", "test = [40, 40]: expected 3 values, one per site (sites = 3)"),
        ("synth", "sites = 2",
         "train = [60, 60, 60] (the default): expected 2 values, one per site (sites = 2)"),
    ],
)
def test_a_wrong_value_is_one_error_naming_the_file_the_key_and_what_is_allowed(
        tmp_path: Path, section: str, line: str, expected: str) -> None:
    path, message = _error(tmp_path, f"[{section}]\n{line}\n")
    assert message == f"{path} [{section}] {expected}"


def test_the_right_types_are_accepted_and_converted() -> None:
    config = config_from_dict({
        "data": {"image_size": [64, 48], "cache_dir": "/tmp/cache", "decode_timeout_s": 5},
        "model": {"dropout": 0},
        "train": {"lr": 1, "threshold": 0, "device": "cuda:12", "precision": "bf16", "balance": "none"},
        "synth": {"sites": 2, "train": [5, 5], "val": [0, 1], "test": [2, 2], "scale": 1},
        "privacy": {"delta": 0.5},
    }, "site.toml")
    assert config.data.image_size == (64, 48)  # a TOML array becomes the tuple the annotation says
    for value in (config.data.decode_timeout_s, config.model.dropout, config.train.lr, config.train.threshold,
                  config.synth.scale):
        assert type(value) is float  # an int is a float's value, stored as a float
    assert config.train.device == "cuda:12" and config.synth.val == [0, 1]
    assert config_from_dict({"data": {"cache_dir": None}, "synth": {"val": None}}) == Config()  # optional
    assert parse_config('[train]\nlr = 2\n').train.lr == 2.0


def test_the_allowed_sets_are_the_annotated_fields_choices() -> None:
    hints = typing.get_type_hints(config_module.TrainConfig)
    rules = {f.name: f.metadata for f in dataclasses.fields(config_module.TrainConfig)}
    assert rules["lr_schedule"]["choices"] == LR_SCHEDULES and rules["balance"]["choices"] == BALANCES
    assert rules["device"]["choices"] == DEVICES and rules["precision"]["choices"] == PRECISIONS
    model_rules = {f.name: f.metadata for f in dataclasses.fields(config_module.ModelConfig)}
    assert model_rules["norm"]["choices"] == NORMS
    assert hints["balance"] is str
    # every plain string key is one of a set (the optional ones are paths)
    for section in SECTIONS.values():
        for f in dataclasses.fields(section):
            if typing.get_type_hints(section)[f.name] is str:
                assert f.metadata["choices"], f"{section.__name__}.{f.name} has no allowed set"


def test_the_model_uses_the_configs_norms() -> None:
    from common import model

    assert model.NORMS is NORMS


def test_every_key_is_a_rule_with_a_docstring() -> None:
    """Each field of each section (and each section of Config) is followed by a non-empty docstring."""
    tree = ast.parse(inspect.getsource(config_module))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for cls in (Config, *SECTIONS.values()):
        body = classes[cls.__name__].body
        documented = {}
        for node, following in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = following.value.value if (isinstance(following, ast.Expr)
                                                and isinstance(following.value, ast.Constant)) else None
                documented[node.target.id] = doc
        assert set(documented) == {f.name for f in dataclasses.fields(cls)}
        for name, doc in documented.items():
            assert isinstance(doc, str) and doc.strip(), f"{cls.__name__}.{name} has no docstring"
        if cls is not Config:
            for f in dataclasses.fields(cls):
                assert "choices" in f.metadata, f"{cls.__name__}.{f.name} is not declared with _rule"


def test_defaults_are_valid_and_survive_a_round_trip() -> None:
    defaults = Config()
    assert config_from_dict({}) == defaults
    assert config_from_dict(config_dict(defaults), "stored") == defaults  # as checkpoints store it
    for name in SECTIONS:  # each default given explicitly passes its own rule
        for key, value in config_dict(defaults)[name].items():
            assert getattr(config_from_dict({name: {key: value}}), name) == getattr(defaults, name), key


def _shipped_configs() -> list[Path]:
    """configs/*.toml that are fedmammo configs, and those that run configs name (pyproject.toml's
    default included)."""
    found = set()
    runs = [tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]]
    for path in sorted((ROOT / "configs").glob("*.toml")):
        values = tomllib.loads(path.read_text())
        if all(isinstance(v, dict) for v in values.values()):
            found.add(path)
        else:  # a run config (`flwr run --run-config`)
            runs.append(values)
    found |= {ROOT / run["config"] for run in runs if "config" in run}
    return sorted(found)


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_shipped_configs_include_demo_and_study() -> None:
    assert {p.name for p in _shipped_configs()} >= {"demo.toml", "study.toml"}


def test_unknown_sections_and_keys_and_unreadable_text(tmp_path: Path) -> None:
    path, message = _error(tmp_path, "[trian]\nepochs = 2\n")
    assert message == f"{path}: unknown section(s) trian; known: data, model, train, synth, privacy"
    path, message = _error(tmp_path, "[train]\nepoch = 2\n")
    assert message.startswith(f"{path} [train]: unknown key(s) epoch; known: epochs, batch_size")
    path, message = _error(tmp_path, "[privacy]\nphysical_batch_size = 8\n")
    assert message.startswith(f"{path} [privacy]: unknown key(s) physical_batch_size; physical_batch_size is "
                              "now in [train]; known: ")
    path, message = _error(tmp_path, "train = 3\n")
    assert message == f"{path}: train = 3: expected a [train] section (a TOML table)"
    path, message = _error(tmp_path, "[train\n")
    assert message.startswith(f"{path}: cannot read config")


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ValueError, match=r"^configs/x\.toml \[train\] balance = 'smote': expected one of"):
        parse_config('[train]\nbalance = "smote"\n', "configs/x.toml")
    with pytest.raises(ValueError, match=r"^the federation's config \[train\] epochs = 0: must be >= 1$"):
        parse_config("[train]\nepochs = 0\n")
    with pytest.raises(ValueError, match=r"^the federation's config: cannot read config"):
        parse_config("[train\n")


def test_dp_sgd_cross_checks_still_apply() -> None:
    with pytest.raises(ValueError, match=r"^site\.toml \[privacy\] dp_sgd = true: model\.norm must be"):
        config_from_dict({"privacy": {"dp_sgd": True, "target_epsilon": 3.0}}, "site.toml")
    with pytest.raises(ValueError, match=r"^site\.toml \[privacy\] delta = 0: must be > 0 and < 1$"):
        config_from_dict({"privacy": {"dp_sgd": True, "delta": 0}, "model": {"norm": "group"}}, "site.toml")
