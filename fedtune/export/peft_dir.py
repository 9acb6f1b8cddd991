"""Export as a PEFT directory (what ``PeftModel.from_pretrained`` and most Python runtimes load)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedtune.export.source import read_adapter_config

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "fedtune.json", "README.md")


def export_peft(adapter_dir: Path, out: Path) -> Path:
    """Copy the adapter's PEFT files (and fedtune.json) to ``out``; refuses a directory without weights."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    read_adapter_config(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (save adapters with safetensors)")
    out.mkdir(parents=True, exist_ok=True)
    for name in PEFT_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, out / name)
    return out
