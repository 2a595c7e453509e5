"""`fedmammo node`: a hospital's SuperNode as one service.

One command starts the site's `flower-supernode` (dialling out to the center over TLS, authenticated by
the site's key, with its data and output folders in the node config, ClientApps in process isolation)
and, beside it, the warm SuperExec (`fedmammo superexec`, `client.superexec`: ClientApps start with
PyTorch already imported). This process supervises both:

- both children's output goes to this process's stdout, each line prefixed by the child's name (and to
  `--log FILE` too, with a timestamp): one place for the site's logs (journald under systemd);
- the SuperExec starts once the SuperNode has joined the SuperLink;
- if either child exits, both are stopped and both restarted, after a back-off that doubles from
  RESTART_MIN_S to RESTART_MAX_S (reset once they ran RESTART_STABLE_S); every restart is logged with
  the count of the last 10 minutes. A SuperNode the SuperLink refuses (its key not registered yet) is
  retried that way until the center registers it;
- SIGTERM or SIGINT stops both (SuperExec first, each child's process group, SIGKILL after
  STOP_GRACE_S) and exits 0; should this process itself be killed, the children get SIGTERM from the
  kernel (Linux's parent-death signal).

Inputs are checked before anything starts, each problem with one line naming the file or setting.
`--systemd` prints a systemd unit that runs this same command as a service, and exits.

The SuperNode keeps no state of its own on disk (Flower 1.42 has no SuperNode database): a restart
registers it again with the SuperLink under a new node id. FLWR_HOME (where Flower unpacks the center's
app) defaults to OUT/flower.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.loopback import free_port

RESTART_MIN_S = 2.0
RESTART_MAX_S = 60.0
RESTART_STABLE_S = 120.0
"""Children that ran this long before failing restart after RESTART_MIN_S again."""
STOP_GRACE_S = 10.0
"""SIGTERM, then this long, then SIGKILL (per child)."""
POLL_S = 0.2
SUPEREXEC_AFTER_S = 30.0
"""The SuperExec starts when the SuperNode joins, or this long after the SuperNode started."""

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""No telemetry, no update check, no `uv sync` of the app (values already in the environment win)."""

SUPERNODE, SUPEREXEC, NODE = "supernode", "superexec", "node"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_JOINED = re.compile(r"SuperNode ID: (\d+)")
_REFUSED = "Failed to activate SuperNode"

# Started instead of the child itself: asks the kernel for SIGTERM when this supervisor dies (Linux's
# PR_SET_PDEATHSIG), then becomes the child (same pid). Not a preexec_fn: this process has threads.
_TRAMPOLINE = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class NodeError(ValueError):
    """An input that stops `fedmammo node` before it starts anything; the message names it."""


@dataclass(frozen=True)
class NodeSettings:
    superlink: str
    data: Path
    out: Path
    name: str
    ca: Path | None = None
    key: Path | None = None
    insecure: bool = False
    runtime_port: int | None = None
    warm: bool = True
    log: Path | None = None

    def node_config(self) -> dict[str, str]:
        """Flower's `--node-config` of the site, read by the ClientApp (`client.app`)."""
        return {"data-path": str(self.data), "output-path": str(self.out), "site-name": self.name}

    def arguments(self) -> list[str]:
        """The `fedmammo node` options that give these settings (absolute paths)."""
        args = ["--superlink", self.superlink]
        if self.insecure:
            args.append("--insecure")
        for flag, path in (("--ca", self.ca), ("--key", self.key)):
            if path is not None:
                args += [flag, str(path)]
        args += ["--data", str(self.data), "--out", str(self.out), "--name", self.name]
        if self.runtime_port is not None:
            args += ["--runtime-port", str(self.runtime_port)]
        if not self.warm:
            args.append("--no-warm")
        if self.log is not None:
            args += ["--log", str(self.log)]
        return args


# --- inputs -------------------------------------------------------------------------------------------

def parse_address(text: str) -> str:
    """`HOST:PORT` (a name, an IPv4 address, or an IPv6 address in brackets); returned unchanged."""
    problem = f"--superlink {text!r}: expected HOST:PORT, e.g. fl.center.example:9093"
    if "://" in text or "/" in text or any(c.isspace() for c in text):
        raise NodeError(f"{problem} (no scheme, path or spaces)")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeError(problem)
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise NodeError(problem)
    elif ":" in host or not re.fullmatch(r"[A-Za-z0-9.\-_]+", host):
        raise NodeError(f"{problem} (an IPv6 address goes in brackets: [::1]:9093)")
    return text


def _read(path: Path, what: str, hint: str = "") -> bytes:
    if not path.exists():
        raise NodeError(f"{what} {path}: no such file{hint}")
    if not path.is_file():
        raise NodeError(f"{what} {path}: not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NodeError(f"{what} {path}: cannot be read by this user ({exc.strerror})") from None


def check_ca(path: Path) -> None:
    data = _read(path, "--ca", " (the center's ca.crt, sent to every hospital)")
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError
    except ValueError:
        raise NodeError(f"--ca {path}: not a PEM certificate (give the center's ca.crt)") from None


def check_key(path: Path) -> None:
    data = _read(path, "--key", " (make the site's key pair with `fedmammo site-key DIR NAME` and send "
                                "NAME.pub to the center)")
    try:
        key = load_ssh_private_key(data, None)
    except (ValueError, TypeError):
        kind = " (that is the public half: give the private NAME.key)" if data.startswith(b"ecdsa-") else ""
        raise NodeError(f"--key {path}: not an unencrypted OpenSSH private key{kind}") from None
    except UnsupportedAlgorithm:
        raise NodeError(f"--key {path}: not an ECDSA private key (`fedmammo site-key` makes one)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeError(f"--key {path}: not an ECDSA private key (`fedmammo site-key` makes one)")


def check_data(path: Path) -> None:
    if not path.is_dir():
        raise NodeError(f"--data {path}: no such folder")
    if not (path / "labels.csv").is_file():
        raise NodeError(f"--data {path}: no labels.csv in it (a site folder holds the DICOM files and "
                        f"labels.csv; `fedmammo check {path}` says what is usable)")
    if not os.access(path, os.R_OK | os.X_OK) or not os.access(path / "labels.csv", os.R_OK):
        raise NodeError(f"--data {path}: cannot be read by this user")


def check_out(path: Path, create: bool) -> None:
    if path.exists() and not path.is_dir():
        raise NodeError(f"--out {path}: exists and is not a folder")
    if not path.exists():
        if not create:
            return
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise NodeError(f"--out {path}: cannot be created ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise NodeError(f"--out {path}: not writable by this user")


def _absolute(text: str) -> Path:
    return Path(text).expanduser().absolute()


def settings_from_args(args: argparse.Namespace, create: bool = True) -> NodeSettings:
    """Check every input (the first problem raises NodeError); `create` makes the output folder."""
    address = parse_address(args.superlink)
    if args.insecure and (args.ca or args.key):
        raise NodeError("--insecure (no TLS, loopback tests only) cannot go with --ca or --key: SuperNode "
                        "authentication needs TLS")
    data = _absolute(args.data)
    check_data(data)
    ca = _absolute(args.ca) if args.ca else None
    if ca is not None:
        check_ca(ca)
    key = _absolute(args.key) if args.key else None
    if key is not None:
        check_key(key)
    out = _absolute(args.out)
    check_out(out, create)
    name = args.name if args.name is not None else data.name
    if not name or not name.isprintable() or '"' in name or "'" in name:
        raise NodeError(f"--name {name!r}: give the site a printable name without quotes")
    for what, path in (("--data", data), ("--out", out)):
        if '"' in str(path) or "'" in str(path):  # Flower's --node-config syntax cannot carry them
            raise NodeError(f"{what} {path}: a path with quotes cannot go in Flower's node config")
    if args.runtime_port is not None and not 0 < args.runtime_port < 65536:
        raise NodeError(f"--runtime-port {args.runtime_port}: not a port number")
    log = _absolute(args.log) if args.log else None
    if log is not None and not create and not log.parent.is_dir():
        raise NodeError(f"--log {log}: its folder does not exist")
    return NodeSettings(superlink=address, data=data, out=out, name=name, ca=ca, key=key,
                        insecure=bool(args.insecure), runtime_port=args.runtime_port, warm=not args.no_warm,
                        log=log)


# --- the children -------------------------------------------------------------------------------------

def _executable(name: str) -> str:
    """A command of this interpreter's environment (the venv need not be on PATH)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise NodeError(f"{name} not found next to {sys.executable} nor on PATH: is fedmammo installed "
                        f"in this environment (`pip install -e .`)?")
    return found


def node_config_text(values: dict[str, str]) -> str:
    """Flower's `--node-config` syntax: `key="text" ...` (TOML basic strings)."""
    return " ".join(f'{key}="{_toml_escape(value)}"' for key, value in values.items())


def _toml_escape(text: str) -> str:
    return text.replace("\\", "\\\\")


def supernode_command(settings: NodeSettings, runtime_port: int) -> list[str]:
    command = [_executable("flower-supernode"), "--superlink", settings.superlink]
    if settings.insecure:
        command.append("--insecure")
    if settings.ca is not None:
        command += ["--root-certificates", str(settings.ca)]
    if settings.key is not None:
        command += ["--auth-supernode-private-key", str(settings.key)]
    command += ["--node-config", node_config_text(settings.node_config()),
                "--host", "127.0.0.1", "--port", str(runtime_port)]
    if settings.warm:
        command += ["--isolation", "process"]
    return command


def superexec_command(runtime_port: int, supernode_pid: int) -> list[str]:
    return [_executable("fedmammo"), "superexec", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--parent-pid", str(supernode_pid)]


def child_env(settings: NodeSettings) -> dict[str, str]:
    env = {**OFFLINE_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("FLWR_HOME", str(settings.out / "flower"))
    # Flower starts its helper processes by name: this environment's bin folder first
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"]))
    return env


class Output:
    """One place for every line: stdout (prefixed by its source) and, with --log, a file (timestamped)."""

    def __init__(self, stream: IO[str], file: Path | None) -> None:
        self._stream, self._lock = stream, threading.Lock()
        self._file = None
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            self._file = file.open("a", buffering=1, encoding="utf-8")

    def line(self, source: str, text: str) -> None:
        """One line; a full disk or a closed stream loses the line, never stops the supervisor."""
        with self._lock:
            with contextlib.suppress(OSError, ValueError):
                self._stream.write(f"{source:9} | {text}\n")
                self._stream.flush()
            if self._file is not None:
                stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                with contextlib.suppress(OSError, ValueError):
                    self._file.write(f"{stamp} {source:9} | {text}\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class Child:
    """One supervised process in its own process group, its output pumped line by line to Output."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], output: Output,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.name, self.output, self.started = name, output, time.monotonic()
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *command]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._pump = threading.Thread(target=self._read, args=(on_line,), name=f"{name}-output", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, on_line: Callable[[str], None] | None) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            text = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            if text:
                self.output.line(self.name, text)
                if on_line is not None:
                    on_line(text)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the child's process group, SIGKILL it after `grace_s`; then whatever is left below it."""
        below = descendants(self.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            try:
                self.process.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                self.output.line(NODE, f"{self.name} did not stop within {grace_s:.0f} s: killed")
        for pid in below:  # a descendant that left the group (none of Flower's do today)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._pump.join(5)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (below := children.get(todo.pop(), []))
        todo += below
    return found


class Supervisor:
    """Starts the SuperNode and the SuperExec, restarts both when either exits, stops both on a signal.

    The SuperExec starts once the SuperNode has joined the SuperLink (or SUPEREXEC_AFTER_S after it
    started, should Flower's log line change): a SuperNode the center refuses or cannot reach yet does
    not pay PyTorch's import at every attempt. Messages wait in the SuperNode until the SuperExec takes
    them. Every child is started from the main thread (the parent-death signal is per thread)."""

    def __init__(self, settings: NodeSettings, output: Output) -> None:
        self.settings, self.output = settings, output
        self.stopping = threading.Event()
        self.joined = threading.Event()
        self.children: list[Child] = []
        self.port = 0
        self.restarts: collections.deque[float] = collections.deque()

    def log(self, text: str) -> None:
        self.output.line(NODE, text)

    def _supernode_line(self, text: str) -> None:
        """Called by the SuperNode's output thread for each of its lines."""
        if match := _JOINED.search(text):
            self.log(f"joined the SuperLink at {self.settings.superlink} as SuperNode {match.group(1)} "
                     f"(site {self.settings.name})")
            self.joined.set()
        elif _REFUSED in text:
            hint = (f"is {self.settings.key.with_suffix('.pub').name} registered at the center "
                    f"(`flwr supernode register`)?" if self.settings.key is not None
                    else "the SuperLink authenticates SuperNodes: give --key")
            self.log(f"the SuperLink refused this SuperNode: {hint}")

    def start(self) -> None:
        self.port = self.settings.runtime_port or free_port()
        self.joined.clear()
        node = Child(SUPERNODE, supernode_command(self.settings, self.port), child_env(self.settings),
                     self.output, self._supernode_line)
        self.children = [node]
        self.log(f"started (supernode {node.pid}; runtime API 127.0.0.1:{self.port})")

    def _start_superexec(self) -> None:
        node = self.children[0]
        superexec = Child(SUPEREXEC, superexec_command(self.port, node.pid), child_env(self.settings),
                          self.output)
        self.children.append(superexec)
        self.log(f"started the SuperExec (superexec {superexec.pid})")

    def stop(self) -> None:
        for child in reversed(self.children):  # the SuperExec first: no new ClientApp while the node stops
            child.stop()
        self.children = []

    def _wait_for_exit(self) -> Child | None:
        """The first child that exits, or None once a stop was asked for."""
        while not self.stopping.wait(POLL_S):
            for child in self.children:
                if child.process.poll() is not None:
                    return child
            if self.settings.warm and len(self.children) == 1 and (
                    self.joined.is_set() or time.monotonic() - self.children[0].started > SUPEREXEC_AFTER_S):
                self._start_superexec()
        return None

    def _handle_signal(self, signum: int, _frame) -> None:
        if not self.stopping.is_set():
            self.log(f"{signal.Signals(signum).name}: stopping")
        self.stopping.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle_signal)
        delay = RESTART_MIN_S
        try:
            while not self.stopping.is_set():
                self.start()
                exited = self._wait_for_exit()
                ran = time.monotonic() - exited.started if exited is not None else 0.0
                code = exited.process.returncode if exited is not None else None
                self.stop()
                if exited is None:
                    break
                now = time.monotonic()
                if ran >= RESTART_STABLE_S:
                    delay = RESTART_MIN_S
                self.restarts.append(now)
                while self.restarts and self.restarts[0] < now - 600:
                    self.restarts.popleft()
                self.log(f"{exited.name} exited with code {code} after {ran:.0f} s: both stopped; restart in "
                         f"{delay:.0f} s ({len(self.restarts)} restart(s) in the last 10 min)")
                if self.stopping.wait(delay):
                    break
                delay = min(2 * delay, RESTART_MAX_S)
        finally:
            self.stop()
        self.log("stopped")
        return 0


# --- systemd ------------------------------------------------------------------------------------------

def _systemd_quote(arg: str) -> str:
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c.isspace() or c in "\"'\\;" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fedmammo_command() -> list[str]:
    """This environment's `fedmammo`, by absolute path."""
    script = Path(sys.executable).with_name("fedmammo")
    if script.exists():
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "common.cli"]


def systemd_unit(settings: NodeSettings, user: str = "fedmammo") -> str:
    """A systemd service that runs `fedmammo node` with `settings` as `user`."""
    exec_start = " ".join(_systemd_quote(a) for a in [*fedmammo_command(), "node", *settings.arguments()])
    writable = [settings.out]
    if settings.log is not None and not settings.log.is_relative_to(settings.out):
        writable.append(settings.log.parent)
    project = Path(__file__).resolve().parents[1]
    out, key = shlex.quote(str(settings.out)), shlex.quote(str(settings.key))
    lines = [
        f"# fedmammo SuperNode of site {settings.name}: as /etc/systemd/system/fedmammo-node.service, then",
        f"#   useradd --system --home-dir {out} --shell /usr/sbin/nologin {user}   # once",
        f"#   mkdir -p {out} && chown -R {user}: {out}"
        + (f" && chown {user}: {key} && chmod 0600 {key}" if settings.key else ""),
        f"#   (and {user} must be able to read {shlex.quote(str(settings.data))})",
        "#   systemctl daemon-reload && systemctl enable --now fedmammo-node",
        "#   journalctl -u fedmammo-node -f      # the SuperNode's and the SuperExec's lines, prefixed",
        "[Unit]",
        f"Description=fedmammo SuperNode of site {settings.name} (federation at {settings.superlink})",
        f"Documentation=file://{project / 'docs' / 'deployment.md'}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Group={user}",
        f"WorkingDirectory={str(settings.out).replace('%', '%%')}",
        f"Environment={_systemd_quote('HOME=' + str(settings.out))}",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=10",
        "# SIGTERM to fedmammo node, which stops the SuperExec and the SuperNode itself; the rest after 60 s",
        "KillMode=mixed",
        "TimeoutStopSec=60",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "ReadWritePaths=" + " ".join(_systemd_quote(str(p)) for p in writable),
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "UMask=0027",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


# --- the command --------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """`fedmammo node --superlink HOST:PORT [--ca FILE] [--key FILE] --data DIR --out DIR [--name SITE]
    [--insecure] [--runtime-port PORT] [--no-warm] [--log FILE] [--systemd [--user NAME]]`."""
    try:
        settings = settings_from_args(args, create=not args.systemd)
        if args.systemd:
            print(systemd_unit(settings, args.user), end="")
            return 0
        _executable("flower-supernode")
        output = Output(sys.stdout, settings.log)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: --log {args.log}: {exc.strerror}", file=sys.stderr)
        return 2
    supervisor = Supervisor(settings, output)
    supervisor.log(f"fedmammo node {shlex.join(settings.arguments())}")
    try:
        return supervisor.run()
    finally:
        output.close()
