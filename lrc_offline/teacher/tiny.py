"""The debug-size teachers: deterministic random weights, 2 layers, width 64, a byte-level tokenizer.

Built in-process from `transformers` configs, so tests and smoke runs need no download.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

__all__ = ["TINY_FAMILIES", "TINY_VOCAB", "tiny_config", "tiny_teacher", "tiny_tokenizer"]

TINY_VOCAB = 320
"""256 byte tokens, three specials, padding up to a round size."""

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token; ids 256-258 are specials."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_char))}
    assert len(vocab) == 256
    vocab.update({BOS: 256, EOS: 257, PAD: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )


def tiny_config(family: str) -> PretrainedConfig:
    """A 2-layer, 64-wide config of `family`, with the family's distinguishing features switched on."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {list(TINY_FAMILIES)}")
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    if family == "llama":
        return AutoConfig.for_model("llama", tie_word_embeddings=True, **common)
    if family == "qwen2":
        # Qwen2 has q/k/v biases and (for small models) a tied head.
        return AutoConfig.for_model("qwen2", tie_word_embeddings=True, **common)
    if family == "qwen3":
        # Qwen3: per-head q/k RMSNorm; untied head here so both head kinds are covered.
        return AutoConfig.for_model("qwen3", tie_word_embeddings=False, **common)
    # Mistral: untied head, sliding window off at this length.
    return AutoConfig.for_model("mistral", tie_word_embeddings=False, sliding_window=None, **common)


def tiny_teacher(family: str, seed: int = 0) -> torch.nn.Module:
    """A deterministic random teacher of `family`; biases and norm weights are randomised too so that
    tests see every parameter matter."""
    config = tiny_config(family)
    config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model
