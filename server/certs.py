"""`fedmammo certs OUT`: a certificate authority and the SuperLink's TLS certificate, for a coordinating
center that has no PKI of its own; `fedmammo site-key OUT NAME`: a hospital's SuperNode key pair, whose
public half the center registers so that only known SuperNodes may join.

Writes `ca.crt` (give it to every hospital: their SuperNodes verify the SuperLink with it), `ca.key` (keep
offline), `server.pem` and `server.key` (the SuperLink's `--ssl-certfile` / `--ssl-keyfile`;
`--ssl-ca-certfile` is `ca.crt`). The server certificate names every host name and IP address the sites
use to reach the SuperLink (subjectAltName): TLS clients check the address they dial against it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import write_atomic

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmammo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: str | Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """Create the CA and the SuperLink certificate for `hosts` in `out`; return the written files by name.

    ECDSA P-384 keys; private keys are written with mode 0600, certificates 0644, each atomically.
    """
    if not hosts:
        raise ValueError("at least one host name or IP address is needed for the server certificate")
    out = Path(out)
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=days)}

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedmammo federation CA")
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"), False)
    ca_cert = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder(subject_name=_name(hosts[0]), issuer_name=ca_name,
                                public_key=server_key.public_key(), serial_number=x509.random_serial_number(),
                                **valid)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    contents = {
        "ca.crt": (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        "ca.key": (_pem_key(ca_key), 0o600),
        "server.pem": (server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        "server.key": (_pem_key(server_key), 0o600),
    }
    written = {}
    for name, (data, mode) in contents.items():
        path = out / name
        write_atomic(path, data)  # its temporary file is created 0600, so a key is never world-readable
        os.chmod(path, mode)
        written[name] = path
    return written


def make_site_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """A site's SuperNode key pair, as Flower reads them: `NAME.key` (OpenSSH private key, mode 0600, for
    `fedmammo node --key`; it never leaves the hospital) and `NAME.pub` (OpenSSH
    public key, for the center's `flwr supernode register`). ECDSA P-384, like the TLS keys."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"site name {name!r}: use letters, digits, '-', '_' and '.' only")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    paths = Path(out) / f"{name}.key", Path(out) / f"{name}.pub"
    for path, data, mode in ((paths[0], private, 0o600), (paths[1], public + f" {name}\n".encode(), 0o644)):
        write_atomic(path, data)
        os.chmod(path, mode)
    return paths


def run_site_key(args: argparse.Namespace) -> int:
    """`fedmammo site-key OUT NAME [--force]`."""
    existing = [p for p in (Path(args.out) / f"{args.name}.key", Path(args.out) / f"{args.name}.pub")
                if p.exists()]
    if existing and not args.force:
        print(f"error: {', '.join(map(str, existing))} exist; pass --force to replace them (the center must "
              "then register the new public key)", file=sys.stderr)
        return 2
    try:
        private, public = make_site_key(args.out, args.name)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {private} (keep it at the hospital) and {public}")
    print(f"the center: flwr supernode register {public.name} CONNECTION --name {args.name}")
    print(f"the hospital's node: fedmammo node --key {private} ...")
    return 0


def run(args: argparse.Namespace) -> int:
    """`fedmammo certs OUT [--host NAME]... [--days N] [--force]`."""
    out = Path(args.out)
    existing = [name for name in FILES if (out / name).exists()]
    if existing and not args.force:
        print(f"error: {out} already holds {', '.join(existing)}; pass --force to replace them "
              "(every site then needs the new ca.crt)", file=sys.stderr)
        return 2
    hosts = args.host or list(DEFAULT_HOSTS)
    try:
        written = make_certificates(out, hosts, args.days)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in written.values())}; server certificate for {', '.join(hosts)}")
    print(f"SuperLink: --ssl-ca-certfile {written['ca.crt']} --ssl-certfile {written['server.pem']} "
          f"--ssl-keyfile {written['server.key']}")
    print(f"each hospital's SuperNode: --root-certificates ca.crt (copy {written['ca.crt']}); "
          f"keep {written['ca.key']} offline")
    return 0
