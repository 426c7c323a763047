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


def references_dir() -> Path:
    """Trained baselines shipped with the repository (``references/<baseline key>``).

    The converged reference that README and docs figures rest on takes 84 minutes to train
    on 2 cores; a fresh clone reads it from here instead. Each entry is an artifact folder,
    loaded as data like any other. Absent when compress is installed without the repository.

    Example:
        >>> references_dir().name
        'references'
    """
    return Path(__file__).resolve().parents[2] / "references"
