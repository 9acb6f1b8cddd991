"""The manifest of an adapter artifact: what it is, where it came from, how private it is, and its files.

A manifest is signed as its canonical JSON bytes (sorted keys, no whitespace), so any change to any
field (a metric, ε, a file hash) breaks the signature. The signed envelope travels as

    {"manifest": {...}, "key_id": "<16 hex>", "signature": "<base64 ed25519 signature>"}
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
HASH_CHUNK = 1 << 20


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Frozen):
    """One file of the artifact, addressed by its content (the blob's sha256)."""

    path: str  # relative, forward slashes, no '..'
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class BaseModelRef(_Frozen):
    """The base model the adapter was trained on: a human id and a hash of its weights."""

    id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AdapterInfo(_Frozen):
    method: str  # lora | prompt_tuning
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = []
    num_virtual_tokens: int | None = None


class Provenance(_Frozen):
    run: str  # the run's name (or directory name)
    round: int


class PrivacyGuarantee(_Frozen):
    level: str  # sample | user | none
    epsilon: float | None = None
    delta: float | None = None
    mechanism: str | None = None
    accountant: str | None = None


class Manifest(_Frozen):
    schema_version: int = SCHEMA_VERSION
    name: str  # the adapter's product name, e.g. "sotu-personal"
    version: int = Field(gt=0)
    base_model: BaseModelRef
    adapter: AdapterInfo
    source: Provenance
    metrics: dict[str, float] = {}
    privacy: PrivacyGuarantee
    created_at: str  # ISO 8601, UTC
    files: list[FileEntry]

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"manifest v{self.version} has no file {path!r}; it has {[f.path for f in self.files]}")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class SignedManifest(_Frozen):
    manifest: Manifest
    key_id: str
    signature: str  # base64 of the ed25519 signature over manifest.canonical_bytes()

    def to_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes) -> "SignedManifest":
        from fedtune.registry.errors import ManifestError

        try:
            return cls.model_validate_json(data)
        except ValueError as err:
            raise ManifestError(
                f"not a signed fedtune manifest (expected JSON with manifest, key_id, signature): {err}"
            ) from None


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def safe_relpath(path: str) -> str:
    """Refuse absolute paths and '..' so a manifest can never write outside its version directory."""
    from fedtune.registry.errors import ManifestError

    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts or "\\" in path:
        raise ManifestError(f"unsafe file path in manifest: {path!r} (expected a relative path without '..')")
    return path


def file_entries(directory: Path) -> list[FileEntry]:
    """Every regular file under ``directory`` (sorted), with its sha256 and size."""
    directory = Path(directory)
    out = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(directory).as_posix()
            out.append(FileEntry(path=rel, sha256=sha256_file(p), size=p.stat().st_size))
    if not out:
        raise FileNotFoundError(f"no files in {directory}: expected a PEFT adapter directory")
    return out
