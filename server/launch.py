"""Starting Flower for fedmammo and reading back what really happened.

One app, two ways to run it: a simulation on this machine (a private simulation SuperLink, each virtual
SuperNode mapped to a site folder) or a run on a deployed federation (a SuperLink the center started,
SuperNodes at the hospitals). Either way `flwr run --stream` submits the app and shows its log, and the
run's outcome is read from the SuperLink (`flwr ls --run-id`), because `flwr run` exits 0 even when the
ServerApp failed.

Every Flower process started here gets a private FLWR_HOME (its `config.toml` holds the connection, so
`flwr run` never rewrites the project's pyproject) and an offline environment: no telemetry, no update
check, no runtime `uv sync` of the app's dependencies. Processes are started in their own process group
and always stopped (terminate, then kill) when their context ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from common.cli import main as fedmammo
from common.config import load_config
from common.loopback import free_port
from common.sites import site_folders
from server.console import APP_DIR, MARKER
from server.settings import Settings, app_defaults

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Successfully started run (\d+)")
_NODE_STARTED = re.compile(r"^node\s+\| started \(", re.MULTILINE)


class LaunchError(RuntimeError):
    """Flower could not be started, or a run could not be submitted or followed."""


@dataclass
class RunOutcome:
    run_id: int
    status: str
    """`finished:completed`, `finished:failed`, `finished:stopped`, ... as the SuperLink reports it."""
    details: str
    """The failure's message (the ServerApp's exception) when there is one."""
    elapsed_s: float
    bytes_in: int
    bytes_out: int
    log: Path

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flower_env(home: Path) -> dict[str, str]:
    """This process's environment with FLWR_HOME = `home` and the offline settings. This interpreter's
    bin folder comes first on PATH: Flower's processes start each other (flower-superexec) by name."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"]))
    path = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    return {**os.environ, **OFFLINE_ENV, "NO_PROXY": no_proxy, "PATH": path, "FLWR_HOME": str(home)}


def _executable(name: str) -> str:
    """A Flower command from this interpreter's environment (a venv need not be on PATH)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def write_connection(home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Add (or replace) the SuperLink connection `name` in `home`/config.toml and make it the default."""
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    superlink[name] = entry
    superlink["default"] = name
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))


@contextlib.contextmanager
def _process(command: list[str], env: Mapping[str, str], log: Path, grace_s: float = 10.0
             ) -> Iterator[subprocess.Popen]:
    """Run `command` in its own process group, output to `log`; stop the group when the context ends
    (SIGTERM, SIGKILL after `grace_s`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        _stop_group(process, grace_s)


def _stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `process` leads (its ServerApp/ClientApp children too), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_healthy(address: str, process: subprocess.Popen, log: Path, root_certificates: Path | None,
                  timeout_s: float = 60.0) -> None:
    scheme = "http" if root_certificates is None else "https"
    context = None if root_certificates is None else ssl.create_default_context(cafile=str(root_certificates))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"flower-superlink exited with code {process.returncode}; see {log}")
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"{scheme}://{address}/health", timeout=2, context=context) as reply:
            if reply.status == 200:
                return
        time.sleep(0.3)
    raise LaunchError(f"flower-superlink did not answer on {address} within {timeout_s:.0f} s; see {log}")


@contextlib.contextmanager
def superlink(home: Path, *, port: int | None = None, simulation: bool = False, certs: Path | None = None,
              database: Path | None = None, supernode_auth: bool = False, ray_address: str | None = None
              ) -> Iterator[str]:
    """A running `flower-superlink` on 127.0.0.1; yields its address. `certs` is a folder written by
    `fedmammo certs` (TLS on), else insecure (simulation only). Its log is `home`/superlink.log. With
    `supernode_auth` only SuperNodes whose public key was registered (`register_supernode`) may connect.

    A simulation SuperLink's engine runs on the Ray cluster at `ray_address` (HOST:PORT of its head), or
    on a Ray instance of its own when None: RAY_ADDRESS reaches the simulation process, whose
    `ray.init()` (flwr's RayBackend) takes no address. "local" is set explicitly, or Ray would attach to
    the last `ray start` cluster of this machine."""
    with superlink_process(home, port=port, simulation=simulation, certs=certs, database=database,
                           supernode_auth=supernode_auth, ray_address=ray_address) as started:
        yield started[0]


@contextlib.contextmanager
def superlink_process(home: Path, *, port: int | None = None, simulation: bool = False,
                      certs: Path | None = None, database: Path | None = None, supernode_auth: bool = False,
                      ray_address: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`superlink`, yielding its address and its process: the leader of the process group that holds the
    ServerApp too, for a supervisor (or a test) that must watch or kill the center."""
    if ray_address is not None and not simulation:
        raise LaunchError("a Ray cluster runs simulations only: ray_address needs simulation=True")
    address = f"127.0.0.1:{port or free_port()}"
    host, _, port_text = address.rpartition(":")
    command = [_executable("flower-superlink"), "--host", host, "--port", port_text,
               "--disable-runtime-dependency-installation"]
    if simulation:
        command.append("--simulation")
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                    "--ssl-keyfile", str(certs / "server.key")]
    if database is not None:
        command += ["--database", str(database)]
    if supernode_auth:
        command.append("--enable-supernode-auth")
    log = home / "superlink.log"
    env = flower_env(home)
    if simulation:
        env["RAY_ADDRESS"] = ray_address or "local"
    with _process(command, env, log) as process:
        _wait_healthy(address, process, log, None if certs is None else certs / "ca.crt")
        yield address, process


NODE_CONFIG_OPTIONS = {"data-path": "--data", "output-path": "--out", "site-name": "--name"}
"""The node config keys a site's ClientApp reads (`client.app`) and the `fedmammo node` option for each."""


@contextlib.contextmanager
def supernode(home: Path, superlink_address: str, node_config: Mapping[str, Any], *,
              root_certificates: Path, port: int | None = None, log: Path | None = None,
              auth_key: Path | None = None, warm: bool = True) -> Iterator[subprocess.Popen]:
    """A hospital's SuperNode as the hospital starts it: `fedmammo node` (`client.node`: the SuperNode,
    dialling out to the SuperLink over TLS, and its warm SuperExec, supervised as one process), with the
    site's `node_config` (`data-path`, `output-path`, `site-name`); `auth_key` is the site's private key
    (`fedmammo site-key`) where the SuperLink authenticates nodes; `port` the SuperNode's local Runtime API
    port (a free one by default). Without `warm`, Flower's own ClientApp processes (`--no-warm`).

    Yields the `fedmammo node` process (its group holds only itself: each child leads its own group).
    Leaving the context SIGTERMs it, which stops both children; its output, both children's lines
    prefixed by their name, goes to `log` (default `home`/supernode.log). FLWR_HOME is `home`."""
    unknown = sorted(set(node_config) - set(NODE_CONFIG_OPTIONS))
    if unknown:
        raise LaunchError(f"node config key(s) {', '.join(unknown)}: `fedmammo node` sets only "
                          f"{', '.join(NODE_CONFIG_OPTIONS)}")
    command = [_executable("fedmammo"), "node", "--superlink", superlink_address,
               "--ca", str(root_certificates)]
    for key, option in NODE_CONFIG_OPTIONS.items():
        if key in node_config:
            command += [option, str(node_config[key])]
    if auth_key is not None:
        command += ["--key", str(auth_key)]
    if port is not None:
        command += ["--runtime-port", str(port)]
    if not warm:
        command.append("--no-warm")
    log = log or home / "supernode.log"
    start = log.stat().st_size if log.exists() else 0
    with _process(command, flower_env(home), log, grace_s=40.0) as process:
        deadline = time.monotonic() + 60
        while not _NODE_STARTED.search(_read_from(log, start)):  # its inputs checked, its children started
            if process.poll() is not None or time.monotonic() > deadline:
                raise LaunchError(f"`fedmammo node` did not start: {_read_from(log, start).strip()[-2000:]}")
            time.sleep(0.1)
        yield process


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def node_config_text(values: Mapping[str, Any]) -> str:
    """Flower's `--node-config` / `--run-config` syntax: `key="text" n=3 flag=true`."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def _check_run_config(run_config: Mapping[str, Any], app: Path) -> None:
    defaults = app_defaults(app)
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise LaunchError(f"unknown run-config key(s) {', '.join(unknown)}; known: {', '.join(defaults)}")


def _flwr(home: Path, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([_executable("flwr"), *args], env=flower_env(home), capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def register_supernode(home: Path, connection: str, public_key: Path, name: str) -> None:
    """Register a site's public key (`fedmammo site-key`) with the SuperLink of `connection`, which must
    run with SuperNode authentication: the Control API's `flwr supernode register`."""
    result = _flwr(home, "supernode", "register", str(public_key), connection, "--name", name)
    if result.returncode != 0:
        raise LaunchError(f"registering {public_key} as {name} failed: {result.stdout.strip()} "
                          f"{result.stderr.strip()}")


def run_status(home: Path, connection: str, run_id: int) -> dict[str, Any]:
    """The SuperLink's record of a run (`flwr ls --run-id ID --format json`)."""
    result = _flwr(home, "ls", connection, "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(result.stdout)["runs"]
        return next(r for r in runs if int(r["run-id"]) == run_id)
    except (ValueError, KeyError, StopIteration) as exc:
        raise LaunchError(f"cannot read the status of run {run_id}: {result.stdout.strip()} "
                          f"{result.stderr.strip()}") from exc


def flwr_run(home: Path, connection: str, run_config: Mapping[str, Any], *, app: Path = APP_DIR,
             federation_config: Mapping[str, Any] | None = None, timeout_s: float = 3600.0,
             echo: Callable[[str], None] | None = None) -> RunOutcome:
    """Submit the app to the SuperLink of `connection` with `run_config` overrides, follow its log until
    it ends, and return the outcome the SuperLink recorded. Lines holding MARKER go to `echo`; the whole
    log to `home`/run-<id>.log. On timeout the run is stopped."""
    _check_run_config(run_config, app)
    overrides = home / "run-config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    command = [_executable("flwr"), "run", str(app), connection, "--stream", "--run-config", str(overrides)]
    if federation_config:
        command += ["--federation-config", node_config_text(federation_config)]
    log = home / "flwr-run.log"
    with log.open("w") as out, subprocess.Popen(command, env=flower_env(home), stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True,
                                                start_new_session=True) as process:
        # The log stream can be silent for long stretches (local training): a timer enforces the limit.
        timed_out = threading.Event()
        watchdog = threading.Timer(timeout_s, lambda: (timed_out.set(), _stop_group(process)))
        watchdog.start()
        try:
            run_id = _follow(process.stdout, out, echo)
            process.wait()
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        if run_id is not None:
            _flwr(home, "stop", str(run_id), connection)
        raise LaunchError(f"run {run_id} did not finish within {timeout_s:.0f} s and was stopped; see {log}")
    if run_id is None:
        raise LaunchError(f"`flwr run` did not start a run (exit code {process.returncode}); see {log}")
    status = _final_status(home, connection, run_id)
    traffic = status.get("network-traffic", {})
    final_log = home / f"run-{run_id}.log"
    log.replace(final_log)
    return RunOutcome(run_id, status["status"], status.get("status-details", ""), float(status["elapsed"]),
                      int(traffic.get("inbound-bytes", 0)), int(traffic.get("outbound-bytes", 0)), final_log)


def _follow(stream: IO[str], out: IO[str], echo: Callable[[str], None] | None) -> int | None:
    run_id, echoed = None, None
    for raw in stream:
        line = _ANSI.sub("", raw)
        out.write(line)
        if run_id is None and (match := _STARTED.search(line)):
            run_id = int(match.group(1))
        if echo is not None and MARKER in line:
            message = line[line.index(MARKER) + len(MARKER):].strip()
            if message != echoed:  # Flower streams each log record twice, in two handlers' formats
                echo(message)
            echoed = message
    return run_id


def _final_status(home: Path, connection: str, run_id: int, wait_s: float = 30.0) -> dict[str, Any]:
    """The log stream can end a moment before the SuperLink records the run as finished: poll for it."""
    deadline = time.monotonic() + wait_s
    while True:
        status = run_status(home, connection, run_id)
        if status["status"].startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


_HOST_PORT = re.compile(r"^(?P<host>[^\s:/]+):(?P<port>\d+)$")
_RAY_NODES = ("import json, ray; ray.init(logging_level='ERROR', log_to_driver=False); "
              "print(json.dumps([node['Resources'] for node in ray.nodes() if node['Alive']]))")
"""A Ray driver that prints each live node's resources (`ray.nodes()`) of the cluster at RAY_ADDRESS."""


def check_site_resources(cpus_per_site: int, gpus_per_site: float) -> None:
    """What a virtual site may ask Ray for: whole CPUs (Flower's simulation config holds an integer), and a
    GPU fraction up to 1 or whole GPUs (Ray's rule for resource quantities)."""
    if isinstance(cpus_per_site, bool) or not isinstance(cpus_per_site, int) or cpus_per_site < 1:
        raise LaunchError(f"CPUs per site = {cpus_per_site!r}: give a whole number >= 1")
    if not gpus_per_site >= 0 or (gpus_per_site > 1 and gpus_per_site != int(gpus_per_site)):
        raise LaunchError(f"GPUs per site = {gpus_per_site!r}: give a fraction in [0, 1] (0.25: four sites "
                          "share a GPU) or a whole number of GPUs")


def sites_at_once(nodes: list[Mapping[str, float]], cpus_per_site: int, gpus_per_site: float) -> int:
    """How many virtual sites run at once on Ray nodes of these resources: Flower's actor pool
    (flwr `pool_size_from_resources`) holds, per node, as many sites as its CPUs and, for sites that ask
    for a GPU, its GPUs hold; a node without a GPU holds no such site."""
    total = 0
    for node in nodes:
        fit = int(node.get("CPU", 0) / cpus_per_site)
        if gpus_per_site > 0:
            fit = min(fit, int(node.get("GPU", 0) / gpus_per_site))
        total += fit
    return total


def ray_cluster_nodes(address: str, timeout_s: float = 90.0) -> list[dict[str, float]]:
    """The resources of each live node of the Ray cluster whose head is at `address` (HOST:PORT), read by
    a Ray driver in a child process with RAY_ADDRESS set, as the simulation process will attach. A
    connection test comes first and the driver is bounded: `ray.init` waits minutes for an absent head."""
    match = _HOST_PORT.match(address)
    if match is None:
        raise LaunchError(f"Ray address {address!r}: give the head's HOST:PORT, as `ray start --head` prints "
                          "it (its --port, 6379 by default)")
    try:
        socket.create_connection((match["host"], int(match["port"])), timeout=10).close()
    except OSError as exc:
        raise LaunchError(f"no Ray head answers at {address} ({exc}): is `ray start --head` running "
                          "there, and is its port reachable from this machine?") from exc
    env = {**os.environ, **OFFLINE_ENV, "RAY_ADDRESS": address}
    try:
        result = subprocess.run([sys.executable, "-c", _RAY_NODES], env=env, capture_output=True, text=True,
                                timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"the Ray cluster at {address} did not accept a driver within {timeout_s:.0f} s"
                          ) from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LaunchError(f"cannot attach to the Ray cluster at {address}: {reason}")
    return json.loads(lines[-1])


def _local_node(federation_config: Mapping[str, Any], gpus_per_site: float) -> dict[str, float]:
    """The resources a simulation's own Ray instance gets: `init-args-num-*`, else this machine's (GPUs
    counted only when a site asks for one: that costs importing torch)."""
    gpus = federation_config.get("init-args-num-gpus")
    if gpus is None and gpus_per_site > 0:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": federation_config.get("init-args-num-cpus") or os.cpu_count() or 1, "GPU": gpus or 0}


def _describe(nodes: list[Mapping[str, float]]) -> str:
    cpus, gpus = (sum(node.get(key, 0) for node in nodes) for key in ("CPU", "GPU"))
    return f"{len(nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s)"


def simulate(data_root: Path, run_config: Mapping[str, Any], *, home: Path | None = None,
             timeout_s: float = 3600.0, echo: Callable[[str], None] | None = None,
             cpus_per_site: int = 1, gpus_per_site: float = 0.0, ray_address: str | None = None,
             federation_config: Mapping[str, Any] | None = None) -> RunOutcome:
    """Run the federation in simulation, one virtual SuperNode per site folder of `data_root`
    (`client.app.site_folders`: virtual node i reads the i-th); `federation_config` adds to Flower's
    simulation settings (e.g. `init-args-num-cpus`: the CPUs Ray may hand out, the machine's by default).

    The engine runs on the Ray cluster whose head is at `ray_address` (HOST:PORT), or on a Ray instance of
    its own when None. Each virtual site's ClientApp asks Ray for `cpus_per_site` CPUs and `gpus_per_site`
    of a GPU (a fraction shares one); when no node can hold one site, this fails before any process starts
    (Flower's engine would fail or wait). On a cluster, `data_root` and the run's `out-dir` must be the same
    shared folders on every node: any node may run any site's message (docs/cluster.md).

    `home` keeps the Flower state and logs (a temporary folder, removed afterwards, when None). Paths in
    `run_config` should be absolute: the ServerApp and ClientApps do not run in this directory.
    """
    _check_run_config(run_config, APP_DIR)  # before any process starts
    try:  # the ServerApp reads the same settings, but only once Flower and Ray have started
        Settings.from_run_config({**app_defaults(), **run_config})
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    check_site_resources(cpus_per_site, gpus_per_site)
    sites = site_folders(data_root)
    if not sites:
        raise LaunchError(f"{data_root}: no site folders (subfolders with a labels.csv)")
    federation_config = {"num-supernodes": len(sites), "client-resources-num-cpus": cpus_per_site,
                         "client-resources-num-gpus": gpus_per_site, **(federation_config or {})}
    if ray_address is None:
        nodes = [_local_node(federation_config, gpus_per_site)]
    else:
        local_only = sorted(key for key in federation_config if key.startswith("init-args-num-"))
        if local_only:
            raise LaunchError(f"{', '.join(local_only)} size a simulation's own Ray instance; a cluster's "
                              "resources are those its nodes declared (`ray start --num-cpus/--num-gpus`)")
        nodes = ray_cluster_nodes(ray_address)
    at_once = sites_at_once(nodes, cpus_per_site, gpus_per_site)
    where = f"the Ray cluster at {ray_address}" if ray_address else "this machine's Ray instance"
    if at_once == 0:
        raise LaunchError(f"{where} ({_describe(nodes)}) has no node that can run a site asking for "
                          f"{cpus_per_site} CPU(s) and {gpus_per_site:g} GPU(s)")
    if echo is not None and ray_address:
        echo(f"{where}: {_describe(nodes)}; {min(at_once, len(sites))} of {len(sites)} sites at a time")
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmammo-flwr-")))
        home.mkdir(parents=True, exist_ok=True)
        address = stack.enter_context(superlink(home, simulation=True, ray_address=ray_address))
        write_connection(home, "fedmammo-simulation", address)
        run_config = {**run_config, "data-root": str(Path(data_root).resolve())}
        return flwr_run(home, "fedmammo-simulation", run_config, federation_config=federation_config,
                        timeout_s=timeout_s, echo=echo)


def _print(line: str) -> None:
    print(line, flush=True)


def _run_config_items(items: list[str] | None) -> dict[str, Any]:
    """`--run-config KEY=VALUE` options as run-config values (TOML values; a bare word is a string)."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise LaunchError(f"--run-config {item!r}: expected KEY=VALUE")
        try:
            values[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = text  # a bare word is a string
    return values


def _run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    values = _run_config_items(args.run_config)
    if args.config:
        values["config"] = str(Path(args.config).resolve())
    if args.rounds is not None:
        values["num-server-rounds"] = args.rounds
    if args.resume:
        values["resume"] = True
    values["out-dir"] = str(Path(args.out).resolve())
    return values


def report_outcome(outcome: RunOutcome, out: Path) -> int:
    """Print the run's real outcome; the exit code follows it, not `flwr run`'s."""
    if not outcome.ok:
        print(f"error: run {outcome.run_id} {outcome.status}: {outcome.details or 'no details'} "
              f"(log: {outcome.log})", file=sys.stderr)
        return 1
    print(f"run {outcome.run_id} completed in {outcome.elapsed_s:.0f} s; "
          f"report: {out / 'report' / 'report.md'}")
    return 0


_SIMULATION_OPTIONS = {"ray_address": "--ray-address", "cpus_per_site": "--cpus-per-site",
                       "gpus_per_site": "--gpus-per-site"}


def run(args: argparse.Namespace) -> int:
    """`fedmammo federate [DATA_ROOT] [--connection NAME] [--config FILE] [--out DIR] [--rounds N]
    [--resume] [--run-config KEY=VALUE]... [--timeout S] [--ray-address HOST:PORT] [--cpus-per-site N]
    [--gpus-per-site F]`: simulation over DATA_ROOT's site folders (on the Ray cluster of --ray-address or
    RAY_ADDRESS when given), or with --connection a run on that deployed SuperLink (from FLWR_HOME's
    config.toml)."""
    try:
        if bool(args.data_root) == bool(args.connection):
            raise LaunchError("give DATA_ROOT (a simulation over its site folders) or --connection NAME "
                              "(a deployed federation), not both")
        run_config = _run_config_from_args(args)
        out = Path(run_config["out-dir"])
        if args.connection:  # `out` is on the machine that runs the SuperLink's ServerApp
            given = [option for key, option in _SIMULATION_OPTIONS.items() if getattr(args, key) is not None]
            if given:
                raise LaunchError(f"{', '.join(given)}: simulation only; a deployed site's resources are "
                                  "its own machine's")
            home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
            outcome = flwr_run(home, args.connection, run_config, timeout_s=args.timeout, echo=_print)
        else:
            ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"  # unset: own Ray
            outcome = simulate(Path(args.data_root), run_config, home=out / "flower", timeout_s=args.timeout,
                               echo=_print, ray_address=None if ray_address == "local" else ray_address,
                               cpus_per_site=1 if args.cpus_per_site is None else args.cpus_per_site,
                               gpus_per_site=args.gpus_per_site or 0.0)
    except (LaunchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_outcome(outcome, out)


DEMO_RUN_CONFIG: dict[str, Any] = {"local-epochs": 1}
"""The demo's run config over the app's defaults (`[tool.flwr.app.config]`; `--run-config` overrides it):
one local epoch per round (8 AdamW steps of 8 exams on a 60-exam site), so that the curve has a point per
epoch of training; what makes those epochs count is in configs/demo.toml."""


def demo(args: argparse.Namespace) -> int:
    """`fedmammo demo [--out DIR] [--config FILE] [--rounds N] [--baselines] [--run-config KEY=VALUE]...`:
    synthetic data for three sites with distinct vendors (`fedmammo synth`, skipped when OUT/data already
    holds the cohort), then the federation in simulation (DEMO_RUN_CONFIG, then --run-config, over the app's
    defaults), then the report; progress on the console, the report's path at the end."""
    out = Path(args.out).resolve()
    config = Path(args.config).resolve()
    try:
        rounds = args.rounds or load_config(config).train.epochs
        overrides = _run_config_items(getattr(args, "run_config", None))
    except (ValueError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = out / "data"
    if not (data / "cohort.json").is_file():
        print(f"writing the synthetic cohort of {config} to {data} ...", flush=True)
        if code := fedmammo(["synth", str(data), "--config", str(config)]):
            return code
    print(f"federated training: {rounds} rounds in simulation, one virtual SuperNode per site", flush=True)
    federated = out / "federated" / time.strftime("%Y%m%d-%H%M%S")  # a new run each time
    run_config = {**DEMO_RUN_CONFIG, "config": str(config), "num-server-rounds": rounds,
                  "out-dir": str(federated), "baselines": bool(args.baselines), **overrides}
    try:
        # Every site trains at once, as deployed sites do: Ray is told of one CPU per site (by default it
        # hands out the machine's, and on 2 cores the third site trained alone after the other two).
        outcome = simulate(data, run_config, home=out / "flower", timeout_s=args.timeout, echo=_print,
                           federation_config={"init-args-num-cpus": len(site_folders(data))})
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_outcome(outcome, federated)
