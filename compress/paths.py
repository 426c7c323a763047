"""Where compress keeps what it makes once and reuses: trained baselines, measured peaks."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: $COMPRESS_CACHE, else ~/.cache/compress.

    Example:
        >>> cache_dir() / "baselines"
    """
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))
