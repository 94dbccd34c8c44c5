"""File-system helpers shared by every writer of files readers must never see half-written: whole
directories (exports, checkpoints, converted teachers) and single files (cache manifests, completion
records, the PCA second moment).

Work in progress is named ``.tmp-<final name>@<host>.<pid>.<random>`` (`temp_path`): the owner in the
name lets any process tell a live writer's temporaries, which it must leave alone, from a killed one's,
which it may remove (`is_stale_temporary`, `remove_stale_temporaries`). Several build workers share one
cache directory, so no worker ever removes a temporary it cannot prove abandoned.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["TMP_PREFIX", "STALE_TEMP_AGE_S", "temp_path", "temp_owner", "is_stale_temporary",
           "remove_stale_temporaries", "fsync_path", "fsync_tree", "write_file_atomic", "json_bytes",
           "write_json_atomic", "atomic_dir", "move_into_place", "remove_path"]  # fmt: skip

TMP_PREFIX = ".tmp-"
"""Name prefix of work in progress (`temp_path`); `lrc_offline.cache.clean_stale` removes such entries."""

STALE_TEMP_AGE_S = 24 * 3600
"""A temporary written on another host counts as abandoned once nothing in it changed for this long.
Its owner's pid cannot be checked from here; a live writer changes its temporaries every batch
(seconds, minutes on the largest teachers), so a day leaves a wide margin for slow batches and
clock skew between hosts, while a killed worker's leftovers still go within a day."""

_OWNER = re.compile(r"^(?P<host>[A-Za-z0-9_.-]+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]+)$")


def _host_id() -> str:
    """This host's name, made safe for file names, plus the pid namespace where Linux tells it: two
    containers sharing a host name but not a process table are then different hosts, so neither
    judges the other's pids."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    return f"{host}_{re.sub(r'[^0-9]', '', namespace)}"


def temp_path(final: str | Path) -> Path:
    """A unique sibling of `final` named as work in progress: TMP_PREFIX, the final name, then the
    owner (this host, this pid) and a random tag after an ``@``.

    The random tag keeps apart the temporaries of one process (threads, retries); the owner lets
    other workers tell a live writer's temporaries from a killed one's (`is_stale_temporary`). The
    name never enters the data written, so it does not affect byte-identical rebuilds.
    """
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}@{_host_id()}.{os.getpid()}.{secrets.token_hex(4)}")


def temp_owner(name: str) -> tuple[str, int] | None:
    """The (host, pid) a `temp_path` name records, or None for another name (a temporary written by
    an older version, or not a temporary at all)."""
    if not name.startswith(TMP_PREFIX) or "@" not in name:
        return None
    match = _OWNER.match(name.rsplit("@", 1)[1])
    return (match["host"], int(match["pid"])) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of `path` and, for a directory, of everything in it (a writer
    adds files to a directory shard as it goes, leaving the directory's own time behind)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def is_stale_temporary(path: str | Path, max_age_s: float = STALE_TEMP_AGE_S) -> bool:
    """Whether the temporary `path` is provably abandoned, so that any process may remove it.

    Written on this host: when the process that wrote it is gone (a live pid, even a reused one, keeps
    it: the safe side). Written on another host, or named without an owner (older versions): when
    nothing in it changed for `max_age_s` seconds (see STALE_TEMP_AGE_S). A temporary removed
    meanwhile counts as stale.
    """
    path = Path(path)
    owner = temp_owner(path.name)
    if owner is not None and owner[0] == _host_id():
        return not _pid_alive(owner[1])
    try:
        return time.time() - _last_change(path) > max_age_s
    except FileNotFoundError:
        return True


def remove_stale_temporaries(folder: str | Path, prefix: str = "", max_age_s: float = STALE_TEMP_AGE_S) -> int:
    """Remove the abandoned temporaries (`is_stale_temporary`) in `folder` whose final names start with
    `prefix`; a live writer's are left alone. Returns how many were removed."""
    removed = 0
    for entry in Path(folder).glob(f"{TMP_PREFIX}{prefix}*"):
        if is_stale_temporary(entry, max_age_s):
            remove_path(entry)
            removed += 1
    return removed


def fsync_path(path: str | Path) -> None:
    """Flush one file or directory entry to stable storage (a no-op where the filesystem refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and directories on some platforms) do not support fsync
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush a file, or every file and directory under `path`, to stable storage."""
    path = Path(path)
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(folder)
    else:
        fsync_path(path)


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
    """Yield a temporary sibling of `final` to fill; on success it replaces `final` (`move_into_place`),
    on any failure (a crash, Ctrl-C) it is removed, so readers only ever see a complete directory or none."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: str | Path, final: str | Path, attempts: int = 100) -> None:
    """Rename `tmp` to `final`, replacing what is there; safe when several processes do it at once
    (the last rename stands, none fails).

    A file is replaced atomically. A directory cannot be: the one in place is first moved aside under
    a temporary name, then removed; between the two renames `final` is briefly absent. Another writer
    may move `final` aside, or put its own there, between our steps: each such step is retried.
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        os.replace(tmp, final)
        return
    for _ in range(attempts):
        try:
            os.rename(tmp, final)  # fails while a non-empty directory is there
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        trash = temp_path(final)
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            continue  # another writer moved it aside first
        remove_path(trash)
    raise OSError(errno.EBUSY, f"could not move {tmp} into place: other writers kept replacing it", str(final))


def remove_path(path: str | Path) -> None:
    """Remove a file or directory tree if it exists (entries another process removes meanwhile are fine)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        while True:
            try:
                shutil.rmtree(path)
                return
            except FileNotFoundError:
                if not path.exists():
                    return
    else:
        path.unlink(missing_ok=True)
