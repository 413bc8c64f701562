"""Where pdserve keeps files of its own (models, built kernels): ``$PDSERVE_CACHE``, default ~/.cache/pdserve."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PDSERVE_CACHE``, default ``~/.cache/pdserve``."""
    return Path(os.environ.get("PDSERVE_CACHE") or Path.home() / ".cache" / "pdserve").expanduser()
