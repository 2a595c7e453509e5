"""Who may join, on loopback with real Flower processes: a SuperLink with SuperNode authentication behind
nginx with configs/nginx-fleet-proxy.conf. The three registered hospitals, each started as a hospital
starts it (`fedmammo node`, via `server.launch.supernode`), connect through the proxy and a run completes;
a SuperNode with an unregistered key is refused every time it tries (its `fedmammo node` keeps retrying,
with back-off, and says why); the Control API is not reachable through the proxy (`flwr ls` and direct
requests fail), while it still is on the SuperLink's own port."""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.sites import site_folders
from server.certs import make_certificates, make_site_key
from server.launch import (
    APP_DIR,
    _executable,
    _stop_group,
    flower_env,
    flwr_run,
    free_port,
    register_supernode,
    superlink,
    supernode,
    write_connection,
)

pytestmark = pytest.mark.slow
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def render_proxy(prefix: Path, listen: str, certs: Path, superlink_address: str) -> Path:
    values = {"PREFIX": prefix, "LISTEN": listen, "CERT": certs / "server.pem", "KEY": certs / "server.key",
              "SUPERLINK": superlink_address, "SUPERLINK_NAME": "localhost", "CA": certs / "ca.crt"}
    text = (APP_DIR / "configs" / "nginx-fleet-proxy.conf").read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", str(value))
    assert "@@" not in text
    prefix.mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


@contextlib.contextmanager
def nginx(conf: Path, prefix: Path, port: int):
    """nginx in the foreground in its own process group, stopped when the context ends."""
    process = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=(prefix / "stderr.log").open("wb"),
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (prefix / "stderr.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.2)
        yield process
    finally:
        _stop_group(process)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)


def request(port: int, ca: Path, method: str, path: str) -> int:
    connection = http.client.HTTPSConnection("localhost", port, timeout=10,
                                             context=ssl.create_default_context(cafile=str(ca)))
    try:
        connection.request(method, path, body=b"" if method == "POST" else None,
                           headers={"content-type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


def flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_executable("flwr"), *args], env=flower_env(home), capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (tests/run.sh installs Debian's nginx)")
def test_registered_sites_join_through_the_fleet_only_proxy_and_an_unknown_key_is_refused(sites, config,
                                                                                          tmp_path):
    certs, keys, center = tmp_path / "certs", tmp_path / "keys", tmp_path / "center"
    make_certificates(certs, ["localhost", "127.0.0.1"])
    ca = certs / "ca.crt"
    folders = site_folders(sites)
    for name in [f.name for f in folders] + ["intruder"]:
        make_site_key(keys, name)
    out = tmp_path / "center-out"
    proxy_port = free_port()
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(superlink(center, certs=certs, supernode_auth=True))
        write_connection(center, "admin", address, ca)
        for folder in folders:
            register_supernode(center, "admin", keys / f"{folder.name}.pub", folder.name)
        prefix = tmp_path / "nginx"
        stack.enter_context(nginx(render_proxy(prefix, f"127.0.0.1:{proxy_port}", certs, address), prefix,
                                  proxy_port))
        proxied = f"127.0.0.1:{proxy_port}"
        for folder in folders:
            stack.enter_context(supernode(
                tmp_path / folder.name, proxied,
                {"data-path": str(folder), "output-path": str(tmp_path / "hospital" / folder.name),
                 "site-name": folder.name}, root_certificates=ca, auth_key=keys / f"{folder.name}.key"))
        intruder = stack.enter_context(supernode(
            tmp_path / "intruder", proxied,
            {"data-path": str(folders[0]), "output-path": str(tmp_path / "intruder-out"),
             "site-name": "intruder"},
            root_certificates=ca, auth_key=keys / "intruder.key"))

        # through the proxy: the health check only; the Control API and everything else refused
        assert request(proxy_port, ca, "GET", "/health") == 200
        for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/fleet/../control/list-runs"),
                             ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("GET", "/docs"),
                             ("POST", "/v1/runtime/get-run"), ("GET", "/v1/fleet/pull-messages")]:
            assert request(proxy_port, ca, method, path) in (403, 405), (method, path)
        write_connection(center, "through-proxy", proxied, ca)
        refused = flwr(center, "ls", "through-proxy", "--format", "json")
        assert not json.loads(refused.stdout)["success"], refused
        assert json.loads(flwr(center, "ls", "admin", "--format", "json").stdout)["success"]  # admin side

        outcome = flwr_run(center, "admin", {"config": config, "num-server-rounds": 1, "local-steps": 1,
                                             "eval-every": 0, "min-nodes": 3, "out-dir": str(out)},
                           timeout_s=480)
        listed = json.loads(flwr(center, "supernode", "list", "admin", "--format", "json").stdout)["nodes"]
        intruder_log = tmp_path / "intruder" / "supernode.log"
        wait_for(lambda: len(re.findall(r"^node +\| supernode exited .* restart in", intruder_log.read_text(),
                                        re.MULTILINE)) >= 2, 120, "the intruder refused twice")
        assert intruder.poll() is None  # refused each time; its supervisor keeps retrying, with back-off
    assert outcome.ok, (outcome.status, outcome.details, outcome.log.read_text()[-3000:])
    with (out / "metrics.csv").open() as f:
        trained = {r["site"] for r in csv.DictReader(f) if r["phase"] == "train"}
    assert trained == {f.name for f in folders} | {"all"}  # the intruder never took part
    assert len(listed) == 3 and {n["status"] for n in listed} == {"online"}, listed  # the registered ones
    assert not list((tmp_path / "intruder-out").glob("runs/*"))
    intruder_text = intruder_log.read_text()
    assert "Failed to activate SuperNode" in intruder_text and "joined the SuperLink" not in intruder_text
    assert "the SuperLink refused this SuperNode: is intruder.pub registered at the center" in intruder_text
    for folder in folders:  # each hospital joined once and was never restarted
        text = (tmp_path / folder.name / "supernode.log").read_text()
        assert text.count("joined the SuperLink") == 1 and "restart in" not in text, folder.name
    access = (prefix / "access.log").read_text()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in access  # the SuperLink refused its key
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access  # the sites really came through nginx
    assert '"POST /v1/control/list-runs HTTP/1.1" 403 146 "-" "python-httpx' in access  # `flwr ls`
