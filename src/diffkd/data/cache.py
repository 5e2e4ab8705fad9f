"""Where downloaded datasets go when the user names no folder: ~/.cache/diffkd/<name>."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """The download folder for one dataset, under $XDG_CACHE_HOME (default ~/.cache)/diffkd."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffkd" / name
