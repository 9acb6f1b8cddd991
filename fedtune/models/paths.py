"""Where fedtune keeps converted models (a user cache directory, never the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("FEDTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fedtune"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
