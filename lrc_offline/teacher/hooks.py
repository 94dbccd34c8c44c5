"""Run a `transformers` teacher once and collect, through forward hooks, what LRC needs from it.

Activations are gathered at the requested token positions inside the hooks, so the full
[batch, tokens, width] activations of every layer never accumulate in memory.

A tensor-parallel teacher (`transformers`' plan: q, k, v, gate, up column-parallel; o, down row-parallel)
gives each process the layer inputs whole, the o and down outputs whole (after the row-parallel
all-reduce) and its own slice of the column-parallel outputs, which the hooks gather whole at the
positions only (a collective: every process of the group runs the same forward). What is returned is
the same on every process of the group, and the same as the teacher loaded whole gives.

Legend: B batch, T tokens, P positions per sequence, D hidden size, V vocabulary, L layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import CLONE_TERMS
from .adapters import ArchAdapter, adapter_for

__all__ = ["TeacherCapture", "capture_teacher", "CLONE_TERMS", "RESIDUAL_TERMS"]
RESIDUAL_TERMS = ("input", "attn")
"""`input` is the decoder layer's input h_i; `attn` is the attention output a_T (after o_proj)."""


@dataclass
class TeacherCapture:
    """What one teacher forward produced.

    logits_BTV: full logits (None unless asked for).
    hidden_BTD: final normed hidden state (None unless asked for).
    acts: term -> [L, B, P, W] at the requested layers and positions (terms among CLONE_TERMS and
        RESIDUAL_TERMS, as asked).
    """

    logits_BTV: torch.Tensor | None = None
    hidden_BTD: torch.Tensor | None = None
    acts: dict[str, torch.Tensor] = field(default_factory=dict)


def _gather(x_BTW: torch.Tensor, positions_BP: torch.Tensor) -> torch.Tensor:
    index = positions_BP.long().unsqueeze(-1).expand(-1, -1, x_BTW.shape[-1])
    return torch.gather(x_BTW, 1, index)


def _whole(module: nn.Module, output: torch.Tensor, positions_BP: torch.Tensor | None = None) -> torch.Tensor:
    """`module`'s output at `positions_BP` (None: all), over all its output features. A tensor-parallel
    linear whose outputs are split between the processes (column-parallel: a plain tensor holding this
    process's slice on the inference path, a DTensor otherwise) is gathered whole, after the positions
    are taken. Anything else is returned as it is (at the positions)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, Shard

        if isinstance(output, DTensor):
            output = output.full_tensor()
    if positions_BP is not None:
        output = _gather(output, positions_BP)
    weight = getattr(module, "weight", None)
    width = getattr(module, "out_features", None)
    if not torch.distributed.is_available() or not isinstance(weight, DTensor) or width in (None, output.shape[-1]):
        return output
    shape = (*output.shape[:-1], width)
    stride = torch.empty(shape, device="meta").stride()
    split = DTensor.from_local(output.contiguous(), weight.device_mesh, [Shard(output.dim() - 1)], run_check=False,
                               shape=shape, stride=stride)  # fmt: skip
    return split.full_tensor()


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _activation_modules(layer: nn.Module, adapter: ArchAdapter) -> dict[str, nn.Module]:
    """Term -> the module of `layer` whose output is that term (`input` is hooked on the layer itself)."""
    attn, mlp = _get(layer, adapter.attn), _get(layer, adapter.mlp)
    return {
        "q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj, "attn": attn.o_proj,
        "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj,
    }  # fmt: skip


def _hook_activations(
    stack: contextlib.ExitStack,
    decoder_layers: nn.Module,
    adapter: ArchAdapter,
    layers: list[int],
    terms: tuple[str, ...],
    positions_BP: torch.Tensor | None,
) -> dict[str, list[torch.Tensor | None]]:
    """Hooks every (layer, term), removed when `stack` closes; returns term -> per-layer slots the next
    forward fills with the activations gathered at `positions_BP`."""
    per_layer: dict[str, list[torch.Tensor | None]] = {t: [None] * len(layers) for t in terms}

    def store(term: str, slot: int):
        def hook(module, args, output):
            per_layer[term][slot] = _whole(module, output, positions_BP)

        return hook

    def store_input(slot: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            per_layer["input"][slot] = _gather(hidden, positions_BP)

        return pre_hook

    for slot, index in enumerate(layers):
        layer = decoder_layers[index]
        modules = _activation_modules(layer, adapter)
        for term in terms:
            if term == "input":
                handle = layer.register_forward_pre_hook(store_input(slot), with_kwargs=True)
            else:
                handle = modules[term].register_forward_hook(store(term, slot))
            stack.callback(handle.remove)
    return per_layer


@torch.no_grad()
def capture_teacher(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None = None,
    positions_BP: torch.Tensor | None = None,
    layers: list[int] | None = None,
    terms: tuple[str, ...] = (),
    want_logits: bool = True,
    want_hidden: bool = False,
    position_ids_BT: torch.Tensor | None = None,
) -> TeacherCapture:
    """One teacher forward with hooks.

    Args:
        model: a `transformers` causal LM with a supported adapter.
        input_ids_BT: token ids.
        attention_mask_BT: 1 for real tokens, 0 for padding (None: all real).
        positions_BP: positions at which activations are gathered (required when `terms` is non-empty).
        layers: layers whose activations are gathered (None: all).
        terms: activation names among CLONE_TERMS + RESIDUAL_TERMS.
        want_logits: return the full logits.
        want_hidden: return the final normed hidden state.
        position_ids_BT: RoPE positions (None: 0..T-1). Without `attention_mask_BT`, positions that restart
            (a step other than +1) also start a new block of a block-diagonal causal mask (`transformers`'
            packed-sequence masking; eager and sdpa: tests/test_document_mask.py): each packed document is
            then seen alone.
    """
    adapter = adapter_for(model.config)
    decoder_layers = _get(model, adapter.layers)
    layers = list(range(len(decoder_layers))) if layers is None else list(layers)
    unknown = set(terms) - set(CLONE_TERMS) - set(RESIDUAL_TERMS)
    assert not unknown, f"unknown activation terms {unknown}"
    assert not terms or positions_BP is not None, "positions are needed to gather activations"
    out = TeacherCapture()

    def store_hidden(module, args, output):
        out.hidden_BTD = output

    with contextlib.ExitStack() as stack:
        per_layer = _hook_activations(stack, decoder_layers, adapter, layers, terms, positions_BP)
        if want_hidden:
            stack.callback(_get(model, adapter.final_norm).register_forward_hook(store_hidden).remove)
        backbone = _get(model, adapter.layers.rsplit(".", 1)[0])
        result = (model if want_logits else backbone)(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT, use_cache=False
        )
    if want_logits:
        # transformers' plans gather the head's output whole; a plan that does not is gathered here
        out.logits_BTV = _whole(model.get_output_embeddings(), result.logits)
    out.acts = {t: torch.stack(v) for t, v in per_layer.items()}
    return out
