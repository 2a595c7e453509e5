"""The run's settings: every run-config key typed and checked at once, with the fedmammo config, before
round 1; a bad value is one error naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_federation_support import InProcessGrid, run_in_process

from server import privacy, strategy
from server.settings import CENTRAL_DP_MODES, STRATEGIES, Settings, app_defaults


@pytest.fixture
def run(config, tmp_path) -> dict:
    return {**app_defaults(), "config": config, "out-dir": str(tmp_path / "out")}


def test_the_app_defaults_are_valid(run):
    settings = Settings.from_run_config(run)
    assert settings.strategy == "fedavg" and settings.out == Path(run["out-dir"])


@pytest.mark.parametrize("key, value, message", [
    ("num-server-rounds", "3", r"num-server-rounds = '3': expected an integer"),
    ("num-server-rounds", 2.5, r"num-server-rounds = 2.5: expected an integer"),
    ("min-nodes", True, r"min-nodes = True: expected an integer"),
    ("secagg", 1, r"secagg = 1: expected true or false"),
    ("round-timeout", "fast", r"round-timeout = 'fast': expected a number"),
    ("strategy", "fedavgx", r"strategy = 'fedavgx': expected one of fedavg, fedprox, fedadam"),
    ("batchnorm", "none", r"batchnorm = 'none': expected one of average, local"),
    ("central-dp", "server", r"central-dp = 'server': expected one of none, server-fixed"),
    ("fraction-train", 0.0, r"fraction-train = 0.0: must be > 0 and <= 1"),
    ("fraction-train", 1.5, r"fraction-train = 1.5: must be > 0 and <= 1"),
    ("num-server-rounds", 0, r"num-server-rounds = 0: must be >= 1"),
    ("trim-beta", 0.5, r"trim-beta = 0.5: must be >= 0 and < 0.5"),
    ("round-timeout", float("nan"), r"round-timeout = nan: must be > 0"),
    ("stats-min-count", 0, r"stats-min-count = 0: must be >= 1"),
])
def test_a_bad_value_names_its_key_and_what_is_allowed(run, key, value, message):
    with pytest.raises(ValueError, match=r"^run config: " + message):
        Settings.from_run_config({**run, key: value})


def test_an_unknown_or_missing_key_is_named(run):
    with pytest.raises(ValueError, match=r"unknown key\(s\) strategyy; known: config, num-server-rounds"):
        Settings.from_run_config({**run, "strategyy": "fedavg"})
    del run["eval-every"]
    with pytest.raises(ValueError, match=r"eval-every is missing: expected an integer"):
        Settings.from_run_config(run)


@pytest.mark.parametrize("changes, message", [
    ({"local-epochs": 0, "local-steps": 0}, "local-epochs or local-steps must be at least 1"),
    ({"secagg": True, "min-nodes": 2}, "secagg needs min-nodes >= 3"),
    ({"secagg": True, "min-nodes": 3, "strategy": "median"}, "strategy 'median' needs single updates"),
    ({"secagg": True, "min-nodes": 3, "transfer-dtype": "bfloat16"}, "SecAgg\\+ sends each update in its"),
    ({"central-dp": "server-fixed", "dp-sampled-sites": 0}, "dp-sampled-sites must be the number"),
    ({"config": "/nonexistent/x.toml"}, r"config: /nonexistent/x.toml does not exist"),
    ({"out-dir": "runs/x"}, r"out-dir = 'runs/x': give an absolute path"),
])
def test_settings_that_do_not_go_together_are_refused(run, changes, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_run_config({**run, **changes})


def test_every_setting_has_a_docstring_and_its_rule():
    source = Path(Settings.__module__.replace(".", "/") + ".py")
    text = (Path(__file__).resolve().parents[1] / source).read_text()
    for line in [line for line in text.splitlines() if "= _rule(" in line and line.startswith("    ")]:
        following = text.split(line, 1)[1].lstrip("\n").splitlines()[0].strip()
        assert following.startswith('"""'), f"no docstring under {line.strip()}"


def test_the_names_settings_allow_are_the_ones_built():
    assert set(strategy.BUILDERS) == set(STRATEGIES)
    assert {"none", *privacy.WRAPPERS} == set(CENTRAL_DP_MODES)


def test_the_center_checks_the_whole_config_before_round_1(sites, config, tmp_path):
    """A typo in the fedmammo config stops the run at the center: no site is ever sent a message."""
    bad = tmp_path / "bad.toml"
    bad.write_text(Path(config).read_text().replace("[train]\n", "[train]\nbalance = \"smote\"\n"))
    sent = []

    class Recording(InProcessGrid):
        def send_and_receive(self, messages, *args, **kwargs):
            sent.extend(messages)
            return super().send_and_receive(messages, *args, **kwargs)

    with pytest.raises(ValueError, match=r"balance.*smote"):
        run_in_process(sites, {"config": str(bad), "out-dir": str(tmp_path / "out")}, grid_class=Recording)
    assert sent == []


def test_central_dp_with_averaged_batchnorm_is_refused_before_round_1(sites, config, tmp_path):
    with pytest.raises(ValueError, match=r"central DP adds noise to every weight sent"):
        run_in_process(sites, {"config": config, "out-dir": str(tmp_path / "out"),
                               "central-dp": "server-fixed", "dp-sampled-sites": 3, "batchnorm": "average"})
