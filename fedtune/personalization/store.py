"""Each device's private adapter part, kept on the device (in simulation: the run's state dir) between rounds.

One safetensors file per device, written atomically (temp file + os.replace): a device that crashes mid-write
keeps its previous private state. Like the privacy ledgers, the store is on disk because simulation workers
are recycled and a device may be served by another worker next round.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedtune.types import AdapterState
from fedtune.workspace import safe_filename


class PrivateStateStore:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, device_key: str) -> Path:
        return self.directory / f"{safe_filename(device_key)}.safetensors"

    def has(self, device_key: str) -> bool:
        return self.path(device_key).is_file()

    def load(self, device_key: str) -> AdapterState | None:
        """The device's private tensors, or None if it has never trained."""
        from safetensors.torch import load_file

        path = self.path(device_key)
        return {k: v.float() for k, v in load_file(str(path)).items()} if path.is_file() else None

    def save(self, device_key: str, state: AdapterState) -> None:
        from safetensors.torch import save_file

        path = self.path(device_key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=path.name, suffix=".tmp")
        os.close(fd)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)

    def keys(self) -> list[str]:
        return sorted(p.name[: -len(".safetensors")] for p in self.directory.glob("*.safetensors"))
