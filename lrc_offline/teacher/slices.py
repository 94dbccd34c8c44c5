"""A teacher read from its safetensors files a slice at a time: each process of a sharded (FSDP2) run
reads only the rows of its own shards, so no process holds the whole teacher.

`open_file_teacher` gives a `FileTeacher`: the `transformers` model with every parameter on the meta
device (its buffers, the rotary frequencies, real), the tokenizer, and a `TeacherFiles` that reads any
tensor, or rows [a, b) of it, from the checkpoint. `file_fingerprints` hashes the weights as
`teacher.fingerprint` hashes a loaded teacher, streaming the files a block of rows at a time.

Why positional reads of the files rather than another loader: FSDP2 shards every tensor on dim 0
(rank r holds rows [r * ceil(n / N), ...)), and rows of a row-major tensor are one contiguous byte range
of a safetensors file, so one read per tensor fills a shard with no other copy. Pages of a memory-mapped
file count in the resident memory of every process that touched them for as long as the map lives; the
page cache behind a plain read does not, so each process's resident teacher bytes are exactly its share.
`transformers`' shard-on-read splits tensors by a tensor-parallel plan (columns or rows per layer kind),
not by FSDP2's dim-0 chunks, and `torch.distributed.checkpoint`'s Hugging Face reader goes through a
load planner and state-dict names of its own; neither gives the rows FSDP2 wants more simply.

Legend: V vocabulary, D d_T.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import ArchAdapter, adapter_for
from .load import load_tokenizer, prepare_tensor_parallel, resolve_hub_id, user_cache_dir

__all__ = ["TeacherFiles", "FileTeacher", "open_file_teacher", "checkpoint_dir", "file_fingerprints"]

log = logging.getLogger(__name__)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip
_HEADER_LIMIT = 100 * 2**20  # the format's own bound on a header


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Byte offset of the tensor's data in its file."""


class TeacherFiles:
    """The tensors of a directory of safetensors files (one file, or several named by
    ``model.safetensors.index.json``), read on demand. `bytes_read` counts what was read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.directory / name for name in names]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory} holds no .safetensors files")
        self.entries: dict[str, _Entry] = {}
        for path in files:
            self.entries.update(_read_header(path))
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` (rows [a, b) of dim 0 with `rows`), in `dtype` (default: as stored)."""
        entry = self.entries[name]
        first, end = (0, entry.shape[0] if entry.shape else 1) if rows is None else rows
        row_shape = entry.shape[1:]
        row_bytes = entry.dtype.itemsize * int(torch.Size(row_shape).numel())
        buffer = torch.empty((end - first) * row_bytes, dtype=torch.uint8)
        if len(buffer):
            with open(entry.path, "rb", buffering=0) as f:
                f.seek(entry.start + first * row_bytes)
                got = f.readinto(memoryview(buffer.numpy()))
            if got != len(buffer):
                raise OSError(f"{entry.path}: tensor {name} is truncated (read {got} of {len(buffer)} bytes)")
        self.bytes_read += len(buffer)
        tensor = buffer.view(entry.dtype).reshape((end - first, *row_shape) if entry.shape else ())
        return tensor if dtype is None or dtype == entry.dtype else tensor.to(dtype)

    def row_blocks(self, name: str, rows_per_block: int, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """Tensor `name` in blocks of `rows_per_block` rows, read one at a time (as ``tensor.split`` cuts it)."""
        num_rows = self.entries[name].shape[0]
        for first in range(0, num_rows, rows_per_block):
            yield self.read(name, (first, min(first + rows_per_block, num_rows)), dtype)


def _read_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _HEADER_LIMIT:
            raise OSError(f"{path} is not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise OSError(f"{path}: tensor {name} has dtype {info['dtype']}, which lrc-offline does not read")
        begin, end = info["data_offsets"]
        entry = _Entry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin)
        assert end - begin == entry.dtype.itemsize * int(torch.Size(entry.shape).numel()), f"{path}: {name} size"
        out[name] = entry
    return out


@dataclass
class FileTeacher:
    """A teacher whose weights stay in its files (see the module docstring)."""

    name: str
    model: nn.Module
    """The `transformers` model, every parameter on the meta device: its config and structure."""
    tokenizer: object
    files: TeacherFiles
    dtype: torch.dtype
    """The dtype tensors are read in (the training's teacher dtype)."""
    source: str | None = None
    revision: str | None = None
    param_names: list[str] = field(default_factory=list)
    """The model's parameter names (tied ones once), each a tensor of `files`."""

    @property
    def config(self):
        return self.model.config

    @property
    def adapter(self) -> ArchAdapter:
        return adapter_for(self.model.config)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.files.read(key, rows, self.dtype)


def checkpoint_dir(name: str, revision: str | None = None) -> tuple[Path, str | None] | None:
    """The directory of safetensors files teacher `name` loads from and, for a Hub id, the commit it
    resolved to; None when it has none (a GGUF file, a checkpoint of .bin files, an unknown name: those
    load whole, through `load_teacher`, which reports what is wrong). Built-in names are written first
    where missing (`load.prepare_tensor_parallel`)."""
    path, commit = Path(name).expanduser(), None
    if name.startswith("tiny-random:") or name == "smollm2-135m":
        prepare_tensor_parallel(name, 1, revision)  # writes the built-in teacher's directory once
        folder = name.replace(":", "-") if name.startswith("tiny-random:") else name
        path = user_cache_dir() / "teachers" / folder  # where load.py keeps built-in teachers
    elif not path.exists() and "/" in name and not name.startswith((".", "/", "~")):
        repo, _, at = name.partition("@")
        try:
            path, commit = resolve_hub_id(repo, revision or at or None)
        except ValueError:
            return None
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return None
    return path, commit


def open_file_teacher(name: str, dtype: torch.dtype, revision: str | None = None) -> FileTeacher | None:
    """Teacher `name` with its weights left in its files, or None when it cannot be read so (see
    `checkpoint_dir`; also when a parameter of the model is not a tensor of the files under its own name,
    which `transformers` would rename while loading)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    found = checkpoint_dir(name, revision)
    if found is None:
        return None
    directory, commit = found
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if name.startswith("tiny-random:"):
        config.architectures = None  # as the in-process tiny teacher's config (`load_teacher`), for its fingerprint
    with init_empty_weights(include_buffers=False):  # parameters on meta, the rotary frequencies computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # accelerate's empty parameters come untied: a tied head is the embedding again
    model.eval().requires_grad_(False)
    files = TeacherFiles(directory)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in files]
    if missing:
        log.info("teacher %s: parameters %s are not stored under their names in %s; loading it whole", name,
                 missing[:3], directory)  # fmt: skip
        return None
    tokenizer = load_tokenizer(name if name.startswith("tiny-random:") else str(directory))
    if commit is not None:
        model.config._commit_hash = commit
    return FileTeacher(name, model, tokenizer, files, dtype, str(directory), commit, names)


def file_fingerprints(teacher: FileTeacher, rows_per_block: int = 4096) -> dict[str, str]:
    """`teacher.fingerprint.teacher_fingerprints` of the teacher, its weights read a block of rows at a
    time: the same hash over the same bytes (each tensor in the training dtype, then bfloat16) as the
    teacher loaded whole gives."""
    from .fingerprint import config_fingerprint, tokenizer_fingerprint

    h = hashlib.sha256()
    shapes = dict((n, tuple(p.shape)) for n, p in teacher.model.named_parameters())
    for name in sorted(teacher.param_names):
        h.update(f"{name}:{shapes[name]}\n".encode())
        if not shapes[name]:
            blocks = iter([teacher.read(name)])
        else:
            blocks = teacher.files.row_blocks(name, rows_per_block, teacher.dtype)
        for block in blocks:
            h.update(block.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return {"teacher_config": config_fingerprint(teacher.model.config), "teacher_weights": "sha256:" + h.hexdigest(),
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer)}  # fmt: skip
