"""Content-addressed blob storage: a small Protocol, and the directory implementation.

Blobs are immutable and named by their sha256, so the same file in two versions is stored (and
downloaded) once. An object store (S3, GCS) can replace ``DirectoryBlobStore`` by implementing
``BlobStore``; nothing else in the registry touches the storage layout.

    root/ab/cd/abcd...ef      one file per blob (two levels of fan-out)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol, runtime_checkable

from fedtune.registry.errors import IntegrityError, NotFoundError

CHUNK = 1 << 20


@runtime_checkable
class BlobStore(Protocol):
    def put_file(self, path: Path) -> str:
        """Store the file's bytes; return its sha256 (hex). Idempotent."""
        ...

    def has(self, digest: str) -> bool: ...

    def size(self, digest: str) -> int: ...

    def open(self, digest: str) -> BinaryIO:
        """A readable binary stream of the blob; raise NotFoundError if absent."""
        ...


def _check_digest(digest: str) -> str:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise NotFoundError(f"not a blob id: {digest!r} (expected 64 lowercase hex digits of a sha256)")
    return digest


class DirectoryBlobStore:
    """Blobs as files under ``root``; writes go to a temp file and are renamed into place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def put_file(self, path: Path) -> str:
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            final = self._path(digest)
            if final.exists():
                os.unlink(tmp)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
            return digest
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def size(self, digest: str) -> int:
        return self._existing(digest).stat().st_size

    def open(self, digest: str) -> BinaryIO:
        return open(self._existing(digest), "rb")

    def local_path(self, digest: str) -> Path:
        """Directory stores only: the file itself (lets the HTTP service stream it with sendfile)."""
        return self._existing(digest)

    def _existing(self, digest: str) -> Path:
        p = self._path(digest)
        if not p.is_file():
            raise NotFoundError(f"blob {digest} is not in the store at {self.root}")
        return p

    def digests(self) -> Iterator[str]:
        for p in self.root.glob("??/??/*"):
            yield p.name

    def verify(self, digest: str) -> None:
        """Re-hash one blob (for audits); raise IntegrityError if its bytes changed on disk."""
        h = hashlib.sha256()
        with self.open(digest) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise IntegrityError(f"blob {digest} in {self.root} now hashes to {h.hexdigest()}: storage corrupted")

    def copy_to(self, digest: str, dest: Path) -> None:
        with self.open(digest) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
