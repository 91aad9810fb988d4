"""``lowband certs``: a CA and certificates for a test deployment, made with the ``cryptography`` package.

- ``DIR/ca.pem`` + ``DIR/ca.key``: an ECDSA P-256 CA (made once; reused when present).
- ``DIR/server.pem`` + ``DIR/server.key``: the coordinator's certificate, its subject alternative names the
  ``--host`` names and addresses nodes dial (``--tls-cert``/``--tls-key`` of ``lowband coordinator``).
- for each ``--node WORKDIR``: ``WORKDIR/tls.pem`` + ``WORKDIR/tls.key``, a client certificate for mutual TLS. Its TLS
  key is a fresh ECDSA P-256 key (gRPC's TLS stack does not sign with ed25519); the certificate names the node's
  identity — the ed25519 key in ``WORKDIR/node.key``, created if missing — in a URI SAN
  ``urn:lowband:node-key:<64 hex>``. A coordinator with ``--tls-client-ca`` accepts a node's Join and calls only
  when its certificate names the key that signs them (coordinator/guard.py).

Private keys are written with mode 0600. Certificates are valid for ``days`` days (default 365).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.errors import ConfigError
from node.identity import NodeKey

NODE_KEY_URI = "urn:lowband:node-key:"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lowband"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, public: object, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


class CertificateAuthority:
    """An ECDSA P-256 CA: ``load_or_create(dir)`` keeps it in ``dir/ca.pem`` and ``dir/ca.key``."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        self.cert, self.key, self.path = cert, key, path

    @classmethod
    def load_or_create(cls, directory: str | Path, days: int = 3650, name: str = "lowband test CA"
                       ) -> "CertificateAuthority":
        d = Path(directory)
        cert_path, key_path = d / "ca.pem", d / "ca.key"
        if cert_path.exists() and key_path.exists():
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load the CA in {d}: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{key_path} is not an ECDSA key")
            return cls(cert, key, cert_path)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder(name, _name(name), key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write(key_path, _pem_key(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        return cls(cert, key, cert_path)

    def _leaf(self, subject: str, public: object, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
              days: int) -> x509.Certificate:
        return (_builder(subject, self.cert.subject, public, days)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))

    def issue_server(self, hosts: Sequence[str], cert_path: Path, key_path: Path, days: int = 365) -> Issued:
        """A server certificate for ``hosts`` (DNS names or IP addresses; raises ConfigError when none)."""
        if not hosts:
            raise ConfigError("a server certificate needs at least one --host (the name or address nodes dial)")
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            except ValueError:
                sans.append(x509.DNSName(h))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(hosts[0], key.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH, days)
        _write(key_path, _pem_key(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        return Issued(cert_path, key_path)

    def issue_node(self, node_key: NodeKey, cert_path: Path, key_path: Path, name: str = "",
                   days: int = 365) -> Issued:
        """A client certificate naming ``node_key`` (URI SAN ``urn:lowband:node-key:HEX``) for a fresh TLS key."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_KEY_URI + node_key.public.hex())]
        cert = self._leaf(name or f"node {node_key.key_id}", key.public_key(), sans, ExtendedKeyUsageOID.CLIENT_AUTH,
                          days)
        _write(key_path, _pem_key(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        return Issued(cert_path, key_path)


def make_certs(directory: str | Path, hosts: Sequence[str] = (), nodes: Sequence[str | Path] = (),
               days: int = 365) -> list[str]:
    """``lowband certs``: the CA in ``directory`` (made once), a server certificate when ``hosts`` are given, a node
    certificate in each of ``nodes`` (workdirs). Returns one line per file written, for the operator."""
    d = Path(directory)
    ca = CertificateAuthority.load_or_create(d)
    lines = [f"CA          {ca.path} (give it to nodes: --tls-ca; to the coordinator for mutual TLS: --tls-client-ca)"]
    if hosts:
        s = ca.issue_server(list(hosts), d / "server.pem", d / "server.key", days)
        lines.append(f"server      {s.cert} + {s.key} (lowband coordinator --tls-cert/--tls-key) for "
                     f"{', '.join(hosts)}")
    for workdir in nodes:
        key = NodeKey.load_or_create(workdir)
        n = ca.issue_node(key, Path(workdir) / "tls.pem", Path(workdir) / "tls.key", days=days)
        lines.append(f"node        {n.cert} + {n.key} (lowband node --tls-cert/--tls-key) for node key {key.key_id}")
    return lines
