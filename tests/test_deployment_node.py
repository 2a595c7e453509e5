"""`fedmammo node`, the hospital's one command: its inputs are checked up front (one line naming the file
or setting, never a traceback); `--systemd` prints a unit that runs it; it supervises the SuperNode and
the warm SuperExec (either one killed: both restarted; SIGTERM: both stopped, nothing left; the
supervisor itself killed: the children follow); and a loopback federation of two hospitals, each started
with `fedmammo node` against a SuperLink with TLS and SuperNode authentication, completes a run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_federation_support import wait_for

from client.node import descendants
from common.cli import main as fedmammo
from common.sites import site_folders
from server.certs import make_certificates, make_site_key
from server.launch import (
    _executable,
    _stop_group,
    flower_env,
    flwr_run,
    register_supernode,
    superlink,
    write_connection,
)

FEDMAMMO = _executable("fedmammo")


@pytest.fixture
def site(tmp_path) -> Path:
    folder = tmp_path / "hospital-a"
    folder.mkdir()
    (folder / "labels.csv").write_text("patient_id,study_uid,laterality,pathology\n")
    return folder


@pytest.fixture
def credentials(tmp_path) -> tuple[Path, Path]:
    """The center's CA (`fedmammo certs`) and the site's private key (`fedmammo site-key`)."""
    make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    make_site_key(tmp_path / "keys", "hospital-a")
    return tmp_path / "certs" / "ca.crt", tmp_path / "keys" / "hospital-a.key"


def node_args(site: Path, out: Path, ca: Path | None, key: Path | None, address: str = "127.0.0.1:9093"
              ) -> list[str]:
    args = ["node", "--superlink", address, "--data", str(site), "--out", str(out)]
    args += ["--ca", str(ca)] if ca else []
    args += ["--key", str(key)] if key else []
    return args


# --- inputs -------------------------------------------------------------------------------------------

def _broken(case: str, tmp: Path, site: Path, ca: Path, key: Path) -> tuple[list[str], str]:
    """The arguments of one broken input and the text its error must hold."""
    out = tmp / "out"
    if case == "data missing":
        return node_args(tmp / "nowhere", out, ca, key), f"--data {tmp / 'nowhere'}: no such folder"
    if case == "no labels.csv":
        (site / "labels.csv").unlink()
        return node_args(site, out, ca, key), f"--data {site}: no labels.csv"
    if case == "CA missing":
        return node_args(site, out, tmp / "ca.crt", key), f"--ca {tmp / 'ca.crt'}: no such file"
    if case == "CA not a certificate":
        (tmp / "ca.crt").write_text("not a certificate\n")
        return node_args(site, out, tmp / "ca.crt", key), f"--ca {tmp / 'ca.crt'}: not a PEM certificate"
    if case == "key missing":
        return (node_args(site, out, ca, tmp / "site.key"),
                f"--key {tmp / 'site.key'}: no such file (make the site's key pair with `fedmammo site-key")
    if case == "public key given":
        public = key.with_suffix(".pub")
        return node_args(site, out, ca, public), f"--key {public}: not an unencrypted OpenSSH private key"
    if case == "key a folder":
        return node_args(site, out, ca, tmp), f"--key {tmp}: not a file"
    if case == "out is a file":
        (tmp / "out-file").write_text("")
        return node_args(site, tmp / "out-file", ca, key), f"--out {tmp / 'out-file'}: exists and is not"
    if case == "insecure with a key":
        return [*node_args(site, out, None, key), "--insecure"], "--insecure (no TLS, loopback tests only)"
    address = {"address without port": "center.example", "address with scheme": "https://center:9093",
               "address port out of range": "center:70000", "address IPv6 unbracketed": "::1:9093"}[case]
    return node_args(site, out, ca, key, address), f"--superlink {address!r}: expected HOST:PORT"


BROKEN = ["data missing", "no labels.csv", "CA missing", "CA not a certificate", "key missing",
          "public key given", "key a folder", "out is a file", "insecure with a key", "address without port",
          "address with scheme", "address port out of range", "address IPv6 unbracketed"]


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_input_is_one_error_line_naming_it(case, tmp_path, site, credentials, capsys):
    args, expected = _broken(case, tmp_path, site, *credentials)
    assert fedmammo(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert expected in captured.err, captured.err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_is_named(tmp_path, site, credentials, capsys):
    ca, key = credentials
    key.chmod(0)
    assert fedmammo(node_args(site, tmp_path / "out", ca, key)) == 2
    assert f"--key {key}: cannot be read by this user" in capsys.readouterr().err


def test_the_command_line_shows_no_traceback(tmp_path, site):
    """The installed command, as a hospital types it: exit code 2, one line, no traceback."""
    result = subprocess.run([FEDMAMMO, *node_args(site, tmp_path / "out", tmp_path / "ca.crt", None)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (f"error: --ca {tmp_path / 'ca.crt'}: no such file (the center's ca.crt, "
                             f"sent to every hospital)\n")


# --- systemd ------------------------------------------------------------------------------------------

def test_systemd_prints_a_unit_running_the_same_command(tmp_path, site, credentials, capsys):
    ca, key = credentials
    out = tmp_path / "site output"  # a space: quoted for systemd
    args = [*node_args(site, out, ca, key, "fl.center.example:9093"), "--name", "hospital-a", "--systemd",
            "--user", "fedsite"]
    assert fedmammo(args) == 0
    unit = capsys.readouterr().out
    assert not out.exists()  # printing the unit creates nothing
    script = Path(sys.executable).with_name("fedmammo")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (f"ExecStart={script} node --superlink fl.center.example:9093 --ca {ca} --key {key} "
                          f'--data {site} --out "{out}" --name hospital-a')
    assert Path(exec_start.split()[0].removeprefix("ExecStart=")).is_absolute()
    for line in ["Restart=on-failure", "User=fedsite", f"WorkingDirectory={out}", f'ReadWritePaths="{out}"',
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "KillMode=mixed",
                 "WantedBy=multi-user.target"]:
        assert line in unit.splitlines(), line
    verify = shutil.which("systemd-analyze")
    if verify:  # systemd's own parser accepts it (it also checks that ExecStart is executable)
        path = tmp_path / f"fedmammo-node-test-{os.getpid()}.service"
        path.write_text(unit)
        result = subprocess.run([verify, "verify", str(path)], capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.returncode == 0, result.stderr


# --- supervision --------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """Running (a zombie, exited but not reaped by its parent, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class Node:
    """`fedmammo node` started as a hospital starts it, its output (the one log) in a file."""

    def __init__(self, args: list[str], log: Path, home: Path) -> None:
        self.log = log
        self.process = subprocess.Popen([FEDMAMMO, *args], env=flower_env(home), stdout=log.open("wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, pattern: str) -> list[re.Match]:
        return list(re.finditer(pattern, self.text(), re.MULTILINE))

    def wait_lines(self, pattern: str, count: int, timeout_s: float) -> list[re.Match]:
        wait_for(lambda: len(self.lines(pattern)) >= count or self.process.poll() is not None, timeout_s,
                 f"{count} x {pattern!r}")
        found = self.lines(pattern)
        assert len(found) >= count, (self.process.returncode, self.text()[-3000:])
        return found

    def children(self, start: int) -> tuple[int, int]:
        """The pids of the SuperNode and the SuperExec of the `start`-th start (1-based)."""
        node = int(self.wait_lines(r"^node +\| started \(supernode (\d+);", start, 120)[start - 1].group(1))
        superexec = self.wait_lines(r"^node +\| started the SuperExec \(superexec (\d+)\)", start, 180)
        return node, int(superexec[start - 1].group(1))


STARTED = r"^node +\| started \(supernode"


@pytest.fixture(scope="module")
def loopback_link(tmp_path_factory) -> Iterator[str]:
    """A plain SuperLink on 127.0.0.1 for the supervision tests (they test the processes, not TLS)."""
    with superlink(tmp_path_factory.mktemp("link")) as address:
        yield address


@contextlib.contextmanager
def node(tmp_path: Path, site: Path, address: str, *extra: str) -> Iterator[Node]:
    started = Node([*node_args(site, tmp_path / "out", None, None, address), "--insecure", *extra],
                   tmp_path / "node.log", tmp_path / "flwr")
    try:
        yield started
    finally:
        _stop_group(started.process)


@pytest.mark.slow
def test_either_child_killed_restarts_both_and_sigterm_stops_everything(tmp_path, site, loopback_link):
    with node(tmp_path, site, loopback_link, "--log", str(tmp_path / "logs" / "node.log")) as n:
        supernode, superexec = n.children(1)
        n.wait_lines(r"^node +\| joined the SuperLink at .* as SuperNode \d+ \(site hospital-a\)", 1, 60)
        assert re.search(r"^supernode +\| INFO", n.text(), re.MULTILINE)  # both children's lines, prefixed

        os.kill(supernode, signal.SIGKILL)  # the SuperNode dies: both go, both come back
        n.wait_lines(r"^node +\| supernode exited with code -9 after \d+ s: both stopped; restart in 2 s "
                     r"\(1 restart\(s\) in the last 10 min\)", 1, 60)
        second = n.children(2)
        assert not alive(supernode) and not alive(superexec) and all(map(alive, second))
        n.wait_lines(r"^node +\| joined the SuperLink", 2, 60)

        os.kill(second[1], signal.SIGKILL)  # the SuperExec dies: the same, after a longer back-off
        n.wait_lines(r"^node +\| superexec exited with code -9 .* restart in 4 s \(2 restart", 1, 60)
        third = n.children(3)
        assert not any(map(alive, second)) and all(map(alive, third))
        below = [pid for child in third for pid in [child, *descendants(child)]]  # forkserver too

        n.process.send_signal(signal.SIGTERM)
        assert n.process.wait(60) == 0
    text = n.text()
    assert "node      | SIGTERM: stopping" in text and text.rstrip().endswith("node      | stopped")
    assert "Traceback" not in text
    wait_for(lambda: not any(map(alive, below)), 10, "every child and grandchild gone")
    logged = (tmp_path / "logs" / "node.log").read_text().splitlines()  # --log: the same lines, timestamped
    assert [line.split(" ", 1)[1] for line in logged] == text.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ", line) for line in logged)


@pytest.mark.slow
def test_the_children_follow_a_killed_supervisor(tmp_path, site, loopback_link):
    with node(tmp_path, site, loopback_link) as n:
        children = n.children(1)
        n.process.kill()
        n.process.wait(10)
        wait_for(lambda: not any(map(alive, children)), 30, "the SuperNode and SuperExec gone")


# --- a federation of hospitals started with `fedmammo node` -------------------------------------------

def online(home: Path, connection: str) -> list[dict]:
    result = subprocess.run([_executable("flwr"), "supernode", "list", connection, "--format", "json"],
                            env=flower_env(home), capture_output=True, text=True, timeout=60, check=False)
    with contextlib.suppress(ValueError, KeyError):
        return [n for n in json.loads(result.stdout)["nodes"] if n["status"] == "online"]
    return []


@pytest.mark.slow
def test_two_hospitals_started_with_fedmammo_node_complete_a_run(sites, config, tmp_path):
    """As docs/deployment.md says: the center makes its CA and runs the SuperLink with SuperNode
    authentication; each hospital makes its key, the center registers the public half; each hospital runs
    `fedmammo node --superlink --ca --key --data --out`; the run completes with the report written."""
    certs, keys, center, out = tmp_path / "certs", tmp_path / "keys", tmp_path / "center", tmp_path / "out"
    assert fedmammo(["certs", str(certs), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    hospitals = site_folders(sites)[:2]
    for folder in hospitals:
        assert fedmammo(["site-key", str(keys), folder.name]) == 0
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(superlink(center, certs=certs, supernode_auth=True))
        write_connection(center, "center", address, certs / "ca.crt")
        for folder in hospitals:
            register_supernode(center, "center", keys / f"{folder.name}.pub", folder.name)
        started = time.monotonic()
        nodes = []
        for folder in hospitals:
            n = Node(node_args(folder, tmp_path / "hospital" / folder.name, certs / "ca.crt",
                               keys / f"{folder.name}.key", address),
                     tmp_path / f"{folder.name}.log", tmp_path / "flwr" / folder.name)
            stack.callback(_stop_group, n.process, 40.0)
            nodes.append(n)
        wait_for(lambda: len(online(center, "center")) == 2, 120, "both hospitals online")
        joined_s = time.monotonic() - started
        outcome = flwr_run(center, "center", {"config": config, "num-server-rounds": 1, "local-steps": 1,
                                              "eval-every": 0, "min-nodes": 2, "out-dir": str(out)},
                           timeout_s=480)
        assert all(n.process.poll() is None for n in nodes)
        for n in nodes:
            n.process.send_signal(signal.SIGTERM)
            assert n.process.wait(60) == 0
    assert outcome.ok, (outcome.status, outcome.details, outcome.log.read_text()[-3000:])
    assert (out / "report" / "report.json").is_file() and (out / "report" / "report.md").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["sites"]) == 2
    for folder, n in zip(hospitals, nodes, strict=True):
        assert list((tmp_path / "hospital" / folder.name).glob("runs/*/predictions/round-0001.csv"))
        text = n.text()
        assert f"(site {folder.name})" in text and "restart in" not in text  # joined once, never restarted
        assert re.search(r"^superexec +\| ", text, re.MULTILINE)  # the warm SuperExec ran its ClientApps
    print(f"\nfedmammo node: 2 hospitals online {joined_s:.1f} s after `fedmammo node` started; run "
          f"{outcome.elapsed_s:.0f} s")
