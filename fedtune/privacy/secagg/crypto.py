"""The protocol's cryptographic primitives, all from ``cryptography`` (OpenSSL): nothing home-made.

- X25519 key agreement; HKDF-SHA256 turns each agreed secret into a 32-byte key bound to a purpose
  label and the round's context (so keys never repeat across purposes or rounds).
- AES-256-GCM for the Shamir shares in transit (authenticated; the (src, dst) pair is associated data,
  so the server that relays a ciphertext cannot redirect it to another client undetected).
- AES-256-CTR keystream as the PRG that expands a 32-byte seed into a mask of field elements.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_NONCE = 12


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()  # OS randomness


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(own: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """HKDF-SHA256(X25519(own, peer)) -> 32 bytes, the same on both sides, distinct per purpose and context."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"fedtune.secagg/" + purpose + b"/" + context).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: nonce (12 bytes) || ciphertext || tag."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Inverse of :func:`seal`; raises ``cryptography.exceptions.InvalidTag`` on any tampering."""
    return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], associated)


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` uniform elements of the unsigned ``dtype`` from AES-256-CTR keyed by ``seed``. [length]

    Each seed is a fresh 32-byte key used for one mask only, so a fixed zero counter block is safe.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a PRG seed is {KEY_BYTES} bytes, got {len(seed)}")
    dtype = np.dtype(dtype)
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(length * dtype.itemsize)) + enc.finalize()
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
