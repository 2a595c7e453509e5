"""`fedmammo site-key`: a hospital's SuperNode key pair in the formats Flower reads."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from common.cli import main as fedmammo


def test_site_key_writes_a_p384_pair_flower_accepts_and_keeps_it(tmp_path, capsys):
    assert fedmammo(["site-key", str(tmp_path), "hospital-a"]) == 0
    private, public = tmp_path / "hospital-a.key", tmp_path / "hospital-a.pub"
    assert private.stat().st_mode & 0o777 == 0o600 and public.stat().st_mode & 0o777 == 0o644
    key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert try_load_public_key(public)  # what `flwr supernode register` does
    assert "flwr supernode register hospital-a.pub CONNECTION --name hospital-a" in capsys.readouterr().out

    before = private.read_bytes()
    assert fedmammo(["site-key", str(tmp_path), "hospital-a"]) == 2  # never silently replaced
    assert "pass --force" in capsys.readouterr().err and private.read_bytes() == before
    assert fedmammo(["site-key", str(tmp_path), "hospital-a", "--force"]) == 0
    assert private.read_bytes() != before
    assert fedmammo(["site-key", str(tmp_path), "../evil"]) == 2
