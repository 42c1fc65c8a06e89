"""corrvos's cache folder: ``$CORRVOS_CACHE``, else ``~/.cache/corrvos`` (unpacked datasets, fetched weights)."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("CORRVOS_CACHE", Path.home() / ".cache" / "corrvos")).expanduser()
