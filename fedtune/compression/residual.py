"""Per-device error-feedback residuals, kept on disk in the run's state dir (like the privacy ledgers).

Simulation workers are recycled and a device may be served by another worker next round, so the
residual lives in a file per device, written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedtune.types import AdapterState


class ResidualStore:
    """One safetensors file per device under ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, device_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_id)
        return self.directory / f"{safe}.safetensors"

    def load(self, device_id: str) -> AdapterState | None:
        from safetensors.torch import load_file

        path = self._path(device_id)
        return load_file(path) if path.is_file() else None

    def save(self, device_id: str, residual: AdapterState) -> None:
        from safetensors.torch import save_file

        path = self._path(device_id)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=path.name, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in residual.items()}, tmp)
        os.replace(tmp, path)
