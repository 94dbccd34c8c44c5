"""Fingerprints of a teacher and its tokenizer, recorded in a cache's manifest and checked by the trainer.

The weights hash is taken over the parameters cast to bfloat16, so the same checkpoint loaded in fp32
for the cache build and in bf16 for training fingerprints the same (a bf16 checkpoint upcast to fp32
casts back exactly). A tensor-parallel teacher hashes its full parameters, gathered one at a time from the
processes' slices: the same bytes, so the same fingerprint, as the teacher loaded whole.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

__all__ = ["config_fingerprint", "weights_fingerprint", "tokenizer_fingerprint", "teacher_fingerprints"]

# Config keys that describe how a checkpoint was loaded or saved, not what it computes.
_VOLATILE_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_attn_implementation",
                  "attn_implementation", "_commit_hash", "use_cache", "quantization_config",
                  "output_attentions", "output_hidden_states", "return_dict"}  # fmt: skip


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_fingerprint(config) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS}
    return _sha(json.dumps(data, sort_keys=True, default=str).encode())


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over (name, shape, bf16 bytes) of every parameter, in name order; tied weights counted once.

    A tensor-parallel parameter (a DTensor) is gathered whole first: a collective, so every process of its
    group calls this at the same point, in the same (name) order, and gets the same hash.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
        full = p.full_tensor() if _is_dtensor(p) else p.detach()
        h.update(full.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (fast tokenizers) or its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(
        {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}, sort_keys=True
    )
    return _sha((body + specials).encode())


def teacher_fingerprints(model: nn.Module, tokenizer) -> dict[str, str]:
    """The fingerprints a cache records: teacher config and weights, and tokenizer."""
    return {
        "teacher_config": config_fingerprint(model.config),
        "teacher_weights": weights_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
