"""Reading a checkpoint's files without running code from them, and with one-line errors.

A checkpoint folder may come from elsewhere (a shared file system, a download, an object store), so
loading one must at worst fail. Every read of a checkpoint file goes through this module:

    trainer.pt            `torch.load(weights_only=True)`: its unpickler builds tensors and plain values only
    student.safetensors   safetensors: raw tensors and a JSON header, nothing is unpickled
    state.json            JSON (read in `checkpoint.py`)
    sharded/              `torch.distributed.checkpoint` (DCP) files, through `load_dcp`

DCP's own `FileSystemReader` and `DefaultLoadPlanner` unpickle two things with plain pickle: the
`.metadata` file (`pickle.load`) and every entry that is not a tensor (the optimiser's
hyperparameters, `torch.load(weights_only=False)`); a crafted folder runs its code in either. Its
tensors are read with `torch.load(weights_only=True)` already. `load_dcp` keeps DCP (resharding,
collectives, the plans) and swaps in two small parts:

- `WeightsOnlyReader.read_metadata` unpickles `.metadata` with an unpickler that resolves only the
  globals DCP's metadata is made of (its dataclasses, `torch.Size`, dtypes, the layout and path
  helpers) and refuses any other by name before anything is called, then checks what it built: a
  `Metadata` whose every entry lies in a plain file of the folder, stored without stream transforms.
  An allowlist of exact names, rather than a scan for "dangerous" ones, is what makes it robust.
- `WeightsOnlyPlanner.load_bytes` reads non-tensor entries with `torch.load(weights_only=True)`;
  the reader refuses to run with any other planner, so no entry reaches `weights_only=False`.

A truncated or garbled file, like a refused one, is a `CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.futures import Future

__all__ = ["CheckpointError", "load_trainer_file", "load_safetensors_file", "load_dcp", "WeightsOnlyReader",
           "WeightsOnlyPlanner"]  # fmt: skip

_FIX = "use an earlier checkpoint"

# Every global a `.metadata` written by torch.distributed.checkpoint refers to (protocol 4 pickles
# of its dataclasses); torch dtypes are allowed separately (`_MetadataUnpickler.find_class`).
_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup among torch's layouts by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id (3.13 moved the class)
})  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, of another version, or does not fit the run resuming from it."""


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a file that failed to load: damaged, or refused by `weights_only` (naming
    the global it refused, without torch's advice to retry with `weights_only=False`)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].split(". Please")[0]
        reason = " ".join(detail.split())
        if "Unsupported global" in reason:
            return CheckpointError(f"{path} holds more than tensors and plain values ({reason}), and loading it "
                                   f"could run code: refused; {_FIX} or one this library wrote")  # fmt: skip
    else:
        lines = text.strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return CheckpointError(f"{path} is damaged or truncated ({reason}); {_FIX}")


def load_trainer_file(path: Path) -> Any:
    """`trainer.pt`: tensors and plain values only (`weights_only=True`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a refused global, a bad pickle opcode: all mean a bad file
        raise _unreadable(path, err) from err


def load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """A `.safetensors` file of a checkpoint (no pickle in the format)."""
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError for a truncated header or data
        raise _unreadable(path, err) from err


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only `_METADATA_GLOBALS` and torch dtypes; refuses any other global before it is called."""

    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.path} refers to {module}.{name}, which checkpoint metadata never holds and "
                              f"loading could run as code: refused; {_FIX} or one this library wrote")  # fmt: skip


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata; {_FIX}")
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str) or name in ("", ".", "..") \
                or Path(name).name != name:  # fmt: skip
            raise CheckpointError(f"{path}: entry {getattr(index, 'fqn', index)!r} is stored in {name!r}, not in a "
                                  f"file of {path.parent}; {_FIX}")  # fmt: skip
        transforms = getattr(info, "transform_descriptors", None)  # absent in older torch
        if transforms:  # DCP as this library calls it writes none
            raise CheckpointError(f"{path}: entry {index.fqn!r} is stored through transforms "
                                  f"{list(transforms)}, which these checkpoints never use; "
                                  f"{_FIX}")  # fmt: skip


class WeightsOnlyReader(FileSystemReader):
    """DCP's `FileSystemReader` with `.metadata` read by an allowlist unpickler and checked, and every
    read error a `CheckpointError` naming its file. Reads only with a `WeightsOnlyPlanner`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        locate = getattr(self, "_get_metadata_path", None)  # per-rank metadata files in newer torch
        path = Path(locate(kwargs.get("rank")) if locate else Path(self.path) / ".metadata")
        try:
            with open(path, "rb") as file:
                metadata = _MetadataUnpickler(file, path).load()  # allowlist: refuses other globals
        except CheckpointError:
            raise
        except FileNotFoundError as err:
            raise CheckpointError(f"{path} is missing; {_FIX}") from err
        except Exception as err:  # EOFError, UnpicklingError, a bad class signature: a damaged file
            raise _unreadable(path, err) from err
        _check_metadata(metadata, path)
        if metadata.storage_meta is None:  # as the parent does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> Future[None]:
        # The planner unpickles the entries that are not tensors: WeightsOnlyPlanner with weights_only=True.
        assert isinstance(planner, WeightsOnlyPlanner), f"{type(planner).__name__} may unpickle with weights_only=False"
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():  # file by file, so that an error names its file
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as err:  # a short or garbled file, or an entry weights_only refused
                raise _unreadable(Path(self.path) / name, err) from err
        done: Future[None] = Future()
        done.set_result(None)
        return done


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that unpickles the entries that are not tensors with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, map_location="cpu", weights_only=True)
        # What DefaultLoadPlanner.load_bytes does with the object it loaded.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state_dict: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """`torch.distributed.checkpoint.load(state_dict)` from the folder `path`, through `WeightsOnlyReader`
    and `WeightsOnlyPlanner` (collective unless `no_dist`).

    Raises:
        CheckpointError: a refused, damaged or missing file, or one that does not fit `state_dict`.
    """
    reader = WeightsOnlyReader(path)
    # Every rank checks the metadata before DCP reads it: DCP would log this error and fall back to
    # per-rank metadata files, burying the reason.
    reader.read_metadata()
    try:
        # Safe: the reader and planner above are the only parts of DCP that unpickle.
        dcp.load(state_dict, storage_reader=reader, planner=WeightsOnlyPlanner(), no_dist=no_dist)
    except CheckpointException as err:  # DCP gathers every rank's exception into this BaseException
        failures = [failure for failure, _ in err.failures.values()]
        ours = [failure for failure in failures if isinstance(failure, CheckpointError)]
        if ours:
            raise ours[0] from None
        reason = (str(failures[0]).strip().splitlines() or [type(failures[0]).__name__])[0]
        raise CheckpointError(f"{path} does not fit the student (or optimiser) loaded from it ({reason}); "
                              "use the student config that saved it") from None  # fmt: skip
