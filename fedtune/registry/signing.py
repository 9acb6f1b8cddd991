"""ed25519 signing of manifests (``cryptography``).

The publisher holds the private key (PEM, PKCS#8, mode 0600); devices are provisioned with the public
key (PEM) out of band and trust nothing the server says about keys. ``key_id`` = first 16 hex digits of
sha256(raw public key), so a device can tell "signed by another key" from "tampered".
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.registry.errors import SignatureError
from fedtune.registry.manifest import Manifest, SignedManifest

log = logging.getLogger(__name__)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)


@dataclass(frozen=True)
class VerifyKey:
    public: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public)


def generate_keypair(private_path: Path, public_path: Path | None = None, overwrite: bool = False) -> SigningKey:
    """Write a new key pair: ``private_path`` (0600) and ``public_path`` (default: same name + .pub).

    Every check happens before the key exists. Each file is written to a new temp file created with
    its final mode (O_EXCL, 0600 for the private key) and renamed over the target, so ``overwrite``
    never inherits an old file's permissions. The PEM bytes are never bound to a name here, so a
    traceback that shows locals cannot show them.
    """
    from fedtune.registry.errors import InputError

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.is_dir():
            raise InputError(f"{p} is a directory; pass a file path for the key (e.g. --out {p / 'signing.key'})")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; refusing to overwrite a key (pass overwrite=True / --force)")
        if p.parent.exists() and not p.parent.is_dir():
            raise InputError(f"{p.parent} is a file, not a directory; choose another --out")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey(Ed25519PrivateKey.generate())
    _write_new(private_path, 0o600, lambda: key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_new(public_path, 0o644, lambda: key.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    log.info("wrote signing key %s (key id %s) and public key %s", private_path, key.key_id, public_path)
    return key


def _write_new(path: Path, mode: int, content: Callable[[], bytes]) -> None:
    """Create a temp file with ``mode`` (O_EXCL: never an existing file), write, fsync, rename over ``path``.

    ``content`` is called inside ``os.write(...)``: the bytes live only on the evaluation stack, in no frame's locals.
    """
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, content())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def load_signing_key(path: Path) -> SigningKey:
    if Path(path).is_dir():
        from fedtune.registry.errors import InputError

        raise InputError(f"{path} is a directory; pass the private key file `fedtune registry keygen` wrote")
    try:  # the PEM bytes are never bound to a local name (tracebacks that show locals cannot show them)
        private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError(f"{path}: not an unencrypted PEM private key; "
                             "make one with `fedtune registry keygen`") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SignatureError(f"{path}: expected an ed25519 private key, got {type(private).__name__}")
    return SigningKey(private)


def load_verify_key(path: Path) -> VerifyKey:
    data = Path(path).read_bytes()
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not a PEM public key ({err}); use the .pub file that "
                             "`fedtune registry keygen` wrote") from None
    if not isinstance(public, Ed25519PublicKey):
        raise SignatureError(f"{path}: expected an ed25519 public key, got {type(public).__name__}")
    return VerifyKey(public)


def sign_manifest(manifest: Manifest, key: SigningKey) -> SignedManifest:
    signature = key.private.sign(manifest.canonical_bytes())
    return SignedManifest(manifest=manifest, key_id=key.key_id, signature=base64.b64encode(signature).decode())


def verify_manifest(signed: SignedManifest, key: VerifyKey) -> Manifest:
    """Return the manifest if its signature verifies with ``key``; raise SignatureError otherwise."""
    m = signed.manifest
    if signed.key_id != key.key_id:
        raise SignatureError(
            f"manifest v{m.version} is signed by key {signed.key_id}, but this device trusts key {key.key_id}; "
            "provision the publisher's public key (or re-publish with the trusted key)"
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        key.public.verify(signature, m.canonical_bytes())
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"manifest v{m.version} ({m.name}): ed25519 signature does not match its contents "
            f"(key {key.key_id}); the manifest was altered after signing. Refusing it."
        ) from None
    return m
