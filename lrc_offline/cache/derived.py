"""Files computed from a cache after it was built (the PCA second moment of its residual vectors, ...),
kept with it under ``derived/<name>/``.

The cache owns this namespace so that nothing else writes beside its manifest and shards: derived files
are not part of the stage-1 artifact, no completion record names them, `verify_cache` leaves them out,
and they may be deleted at any time (``lrc-cache clean --derived``): whoever needs one recomputes it.
"""

from __future__ import annotations

from pathlib import Path

from lrc_offline.storage import Location, as_location

__all__ = ["DERIVED_DIR", "derived_location", "derived_names", "remove_derived"]

DERIVED_DIR = "derived"


def derived_location(root: str | Path | Location, name: str, storage_options: dict | None = None) -> Location:
    """Where the derived files called `name` (a folder name, e.g. ``pca``) of the cache at `root` live."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"derived name {name!r} must be one plain folder name (such as 'pca')")
    return as_location(root, storage_options) / f"{DERIVED_DIR}/{name}"


def derived_names(root: str | Path | Location, storage_options: dict | None = None) -> list[str]:
    """Names of the derived files the cache at `root` holds ([] if none)."""
    return as_location(root, storage_options).names(DERIVED_DIR)


def remove_derived(root: str | Path | Location, storage_options: dict | None = None) -> list[str]:
    """Remove every derived file of the cache at `root`; returns the names removed."""
    location = as_location(root, storage_options)
    names = location.names(DERIVED_DIR)
    location.remove(DERIVED_DIR)
    return names
