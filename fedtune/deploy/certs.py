"""Test PKI for a deployment: a local CA, the SuperLink's TLS certificate, SuperNode auth keys.

For loopback tests and first trials only: production uses a real CA and keys made on the device.

    certs/
      ca.crt, ca.key                 the CA (self-signed, P-256 ECDSA, 30 days by default)
      server.crt, server.key         the SuperLink's TLS certificate, SANs: the given hosts + localhost
      supernodes/<name>              a SuperNode's private key (OpenSSH, EC P-384; `--auth-supernode-private-key`)
      supernodes/<name>.pub          its public key (OpenSSH; the SuperLink registers it)
      identities/<name>              a device's ed25519 identity key (PEM; signs its SecAgg+ key adverts)
      identities/<name>.pub          its public key (hex of the 32 raw bytes; registered beside the node key)

Flower 1.41 wants the SuperNode keys as OpenSSH EC keys on a NIST curve (``load_ssh_private_key``,
``flwr supernode register`` refuses other key types).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def supernodes(self) -> Path:
        return self.root / "supernodes"

    def supernode_key(self, name: str) -> Path:
        return self.supernodes / name

    def supernode_public_keys(self) -> list[Path]:
        return sorted(self.supernodes.glob("*.pub")) if self.supernodes.is_dir() else []

    @property
    def identities(self) -> Path:
        return self.root / "identities"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca_and_server(root: str | Path, hosts: list[str] | None = None, days: int = 30) -> CertPaths:
    """A CA and a server certificate signed by it, valid for ``hosts`` (plus localhost and 127.0.0.1)."""
    paths = CertPaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = list(dict.fromkeys([*(hosts or []), "localhost", "127.0.0.1", "::1"]))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(paths.root / "ca.key", _pem_key(ca_key))
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(key))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def make_supernode_key(root: str | Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: (private key path, public key path)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"SuperNode key name {name!r}: expected a plain file name, e.g. device-1")
    paths = CertPaths(Path(root))
    key = ec.generate_private_key(ec.SECP384R1())
    private = paths.supernode_key(name)
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public = private.with_name(name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make_device_identity(root: str | Path, name: str) -> tuple[Path, Path]:
    """A device's ed25519 identity key for signed SecAgg+ key adverts (``fedtune.privacy.secagg.identity``):
    (private key path, public key path). Flower's node-auth keys are EC P-384, which ed25519 signatures cannot
    reuse, so the identity is its own key pair, registered with the operator beside the node key."""
    from fedtune.privacy.secagg.identity import DeviceIdentity

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"identity key name {name!r}: expected a plain file name, e.g. device-1")
    identity = DeviceIdentity.generate()
    private = CertPaths(Path(root)).identities / name
    identity.save(private)
    public = private.with_name(name + ".pub")
    public.write_text(identity.public_bytes().hex() + "\n")
    return private, public
