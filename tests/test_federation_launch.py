"""Launching pieces that need no Flower process: certificates, connections, run-config checks."""

from __future__ import annotations

import datetime
import ipaddress
import tomllib
from argparse import Namespace

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from server.certs import run as certs
from server.launch import LaunchError, flwr_run, node_config_text, simulate, write_connection
from server.launch import run as federate
from server.settings import app_defaults


def test_certs_verify_for_every_named_host_and_are_not_overwritten(tmp_path, capsys):
    args = Namespace(out=str(tmp_path), host=["fl.hospital.example", "10.0.0.5"], days=30, force=False)
    assert certs(args) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    store = Store([ca])
    now = datetime.datetime.now(datetime.UTC)
    for name in (x509.DNSName("fl.hospital.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))):
        PolicyBuilder().store(store).time(now).build_server_verifier(name).verify(server, [])
    other = PolicyBuilder().store(store).time(now).build_server_verifier(x509.DNSName("other.example"))
    with pytest.raises(Exception, match=r"(?i)mismatch|not match|no matching"):
        other.verify(server, [])
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0
    assert certs(args) == 2 and "already holds" in capsys.readouterr().err
    assert certs(Namespace(**{**vars(args), "force": True})) == 0
    assert x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()) != ca


def test_connections_are_written_to_a_private_flower_home(tmp_path):
    write_connection(tmp_path, "sim", "127.0.0.1:9000")
    write_connection(tmp_path, "tls", "127.0.0.1:9001", tmp_path / "ca.crt")
    config = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert config["default"] == "tls"
    assert config["sim"] == {"address": "127.0.0.1:9000", "insecure": True}
    assert config["tls"] == {"address": "127.0.0.1:9001", "root-certificates": str(tmp_path / "ca.crt")}


def test_node_config_syntax_and_unknown_run_config_keys(tmp_path):
    assert node_config_text({"data-path": "/data/site a", "rounds": 3, "flag": True}) == \
        'data-path="/data/site a" rounds=3 flag=true'
    assert app_defaults()["strategy"] == "fedavg"
    with pytest.raises(LaunchError, match=r"unknown run-config key\(s\) num-rounds; known: config, "):
        flwr_run(tmp_path, "nowhere", {"num-rounds": 2})
    # a simulation checks every value before Flower and Ray start (the ServerApp would, seconds later)
    with pytest.raises(LaunchError, match="transfer-dtype = 'int8': expected one of float32, bfloat16"):
        simulate(tmp_path, {"out-dir": str(tmp_path / "out"), "transfer-dtype": "int8"}, home=tmp_path)


def test_federate_command_reports_bad_arguments_in_one_line(tmp_path, capsys):
    args = Namespace(data_root=None, connection=None, config=None, out=str(tmp_path / "out"), rounds=None,
                     resume=False, run_config=[], timeout=60.0, ray_address=None,
                     cpus_per_site=None, gpus_per_site=None)
    assert federate(args) == 2
    assert "give DATA_ROOT" in capsys.readouterr().err
    assert federate(Namespace(**{**vars(args), "data_root": str(tmp_path), "run_config": ["rounds=2"]})) == 2
    assert "unknown run-config key(s) rounds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
