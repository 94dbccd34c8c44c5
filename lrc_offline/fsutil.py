"""File-system helpers shared by every writer of files readers must never see half-written: whole
directories (exports, checkpoints, converted teachers) and single files (cache manifests, completion
records, the PCA second moment)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["TMP_PREFIX", "temp_path", "fsync_path", "write_file_atomic", "json_bytes", "write_json_atomic", "atomic_dir", "remove_path"]

TMP_PREFIX = ".tmp-"
"""Name prefix of work in progress (`temp_path`); `lrc_offline.cache.clean_stale` removes such entries."""


def temp_path(final: str | Path) -> Path:
    """A unique sibling of `final` named as work in progress (TMP_PREFIX).

    The pid and a random tag keep concurrent writers (retries, duplicate array tasks) apart; the name
    never enters the data written, so it does not affect byte-identical rebuilds.
    """
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_path(path: str | Path) -> None:
    """Flush one file or directory entry to stable storage (a no-op where the filesystem refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and directories on some platforms) do not support fsync
    finally:
        os.close(fd)


def write_file_atomic(path: str | Path, write: bytes | Callable[[Path], None], exclusive: bool = False) -> bool:
    """Write `path` so readers see either the old file (or none) or the whole new one, never a part.

    Args:
        path: The file to write.
        write: The bytes, or a function that writes the file at the temporary path it is given.
        exclusive: Never replace an existing file. Hard-linking the finished temporary file makes
            creation atomic and exclusive (of many writers starting at once, exactly one creates it);
            on filesystems without hard links it falls back to an atomic but non-exclusive replace.

    Returns:
        True when this call wrote `path`; False only with `exclusive` when the file already existed.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        if isinstance(write, (bytes, bytearray)):
            with open(tmp, "wb") as file:
                file.write(write)
        else:
            write(tmp)
        fsync_path(tmp)
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:
                if path.exists():
                    return False
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True


def json_bytes(data: Any) -> bytes:
    """`data` as indented JSON with sorted keys: the one way manifests and records are written."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(path: str | Path, data: Any, exclusive: bool = False) -> bool:
    """`write_file_atomic` of `data` as `json_bytes` (see there for `exclusive`)."""
    return write_file_atomic(path, json_bytes(data), exclusive)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it replaces `final`, on any failure
    (a crash, Ctrl-C) it is removed, so readers only ever see a complete directory or none."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_path(path: str | Path) -> None:
    """Remove a file or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
