"""Where NSRU keeps what it computes once and reuses: target models, self-samples, converted weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$NSRU_CACHE``, else ``~/.cache/nsru``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("NSRU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nsru"
