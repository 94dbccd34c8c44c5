"""The Hugging Face config of an exported student, and the check that `transformers` accepts a student size.

Apart from `export.py` so that `lrc.py` can refuse an unexportable size before training while the
imports point one way: lrc -> hf_config, export -> lrc and hf_config.
"""

from __future__ import annotations

import copy

from ..config import ConfigError

__all__ = ["hf_config", "check_exportable"]


def hf_config(teacher_config, hidden_size: int, head_dim: int, tied: bool):
    """The teacher's HF config with the student's hidden size, an explicit head_dim and the head's tying."""
    config = copy.deepcopy(teacher_config)
    config.hidden_size = hidden_size
    config.head_dim = head_dim
    config.tie_word_embeddings = tied
    # auto_map names the teacher's custom code, which was never run (the teacher loads without
    # trust_remote_code, as its built-in architecture): the student is that plain architecture
    for key in ("quantization_config", "_name_or_path", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def check_exportable(teacher_config, hidden_size: int) -> None:
    """Refuse, before any training, a student size that `transformers` would not save or load.

    Some config classes validate their shapes (transformers 5's LlamaConfig wants hidden_size to be a
    multiple of num_attention_heads, even with an explicit head_dim).
    """
    heads = teacher_config.num_attention_heads
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // heads
    config = hf_config(teacher_config, hidden_size, head_dim, True)
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as err:  # the config classes raise their own validation error types
        below, above = hidden_size - hidden_size % heads, hidden_size - hidden_size % heads + heads
        raise ConfigError(
            f"student.hidden_size={hidden_size} cannot be exported as a {config.model_type} checkpoint: "
            f"{str(getattr(err, '__cause__', None) or err).rstrip('.')}. Use a multiple of the teacher's "
            f"{heads} attention heads, e.g. {below or heads} or {above}"
        ) from err
