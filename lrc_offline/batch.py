"""What one training step reads: a typed batch, built once where batches are made.

Stage 2's batch sources build a `Batch`: the cache reader (`training.reader.collate`, from the cache's
fields stacked per sequence) and the online reference (`online.OnlineSource`, from a hooked teacher
forward). The objective, the loop and the PCA start read its attributes. This module is the only place
in stage 2 that knows the cache's field names (`docs/cache_format.md`), and the one place where the
clone loss's per-position facts are derived: which (layer, position) rows a sequence carries and which
positions are attention sinks, with the helpers the cache build writes them with
(`cache.act_stats.keep_mask`, `cache.act_stats.sink_flags`).

Legend: B sequences, T tokens, V vocabulary, D d_T, K top-k ids, N sampled ids, L clone layers (the
teacher layers the activations belong to), P activation positions, W width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .cache.act_stats import keep_mask, sink_flags
from .config import CLONE_TERMS

__all__ = [
    "FullLogits",
    "HiddenSignal",
    "TopKSignal",
    "SampledSignal",
    "LogitSignal",
    "CloneActivations",
    "Batch",
    "RESIDUAL_FIELDS",
    "clone_activations",
    "logit_field_names",
]

RESIDUAL_FIELDS = ("act_positions", "position_ids", "act_input", "act_attn", "act_present", "act_layer_mask")
"""The cache fields the residual activations of a batch are made of (the last two only in a cache with
an activation budget or a layer subset)."""


@dataclass(frozen=True)
class FullLogits:
    """The teacher's full logits (online training, tests)."""

    logits: torch.Tensor
    """[B, T, V]."""


@dataclass(frozen=True)
class HiddenSignal:
    """The teacher's final normed hidden state: exact logits through the teacher's head, any temperature."""

    hidden: torch.Tensor
    """[B, T, D]."""


@dataclass(frozen=True)
class TopKSignal:
    """The teacher's top-k log-probabilities; the mass they leave is a KL tail bucket."""

    ids: torch.Tensor
    """[B, T, K] token ids."""
    logprobs: torch.Tensor
    """[B, T, K] log-probabilities at the cache's temperature."""


@dataclass(frozen=True)
class SampledSignal:
    """Sampled KD: unique ids of N draws from the teacher, with their counts."""

    ids: torch.Tensor
    """[B, T, N] token ids."""
    counts: torch.Tensor
    """[B, T, N] draws per id (0 pads a row with fewer unique ids)."""


LogitSignal = FullLogits | HiddenSignal | TopKSignal | SampledSignal
"""The teacher's logit signal: one kind per batch."""


@dataclass(frozen=True)
class CloneActivations:
    """The teacher's activations for the clone loss, at P positions of each sequence in L layers."""

    positions_BP: torch.Tensor
    """Token positions of the activations."""
    acts: dict[str, torch.Tensor]
    """term -> [B, L, P, W]: the residuals `input` and `attn` (layer input h_i and attention output a_T;
    the targets are recomputed from them with the teacher's weights), or the seven targets themselves
    (`config.CLONE_TERMS`)."""
    sink_BP: torch.Tensor
    """bool: the positions that are attention sinks (document starts)."""
    keep_LBP: torch.Tensor | None = None
    """bool: the (layer, position) rows each sequence carries; the others hold zeros and never count (an
    activation-budget or layer-subset cache). None: every row."""
    present_B: torch.Tensor | None = None
    """bool: the sequences that carry activations (an activation-budget cache). None: every sequence."""

    @classmethod
    def build(
        cls,
        positions_BP: torch.Tensor,
        acts: dict[str, torch.Tensor],
        position_ids_BT: torch.Tensor | None = None,
        present_B: torch.Tensor | None = None,
        layer_mask_BLP: torch.Tensor | None = None,
    ) -> CloneActivations:
        """The activations with their sink flags and keep mask. `position_ids_BT` (0 starts a document;
        None: only the sequence start is a sink), `present_B` and `layer_mask_BLP` (bool) as a cache stores
        them."""
        num_layers, num_positions = next(iter(acts.values())).shape[1:3]
        keep_BLP = keep_mask(present_B, layer_mask_BLP, num_layers, num_positions)
        return cls(positions_BP, acts, sink_flags(positions_BP, position_ids_BT),
                   None if keep_BLP is None else keep_BLP.transpose(0, 1), present_B)  # fmt: skip

    def num_present(self) -> int:
        """How many sequences carry activations (a host sync if `present_B` is on a device)."""
        return len(self.positions_BP) if self.present_B is None else int(self.present_B.sum())


@dataclass(frozen=True)
class Batch:
    """B packed sequences with their teacher signal."""

    input_ids: torch.Tensor
    """[B, T] token ids."""
    attention_mask: torch.Tensor | None = None
    """[B, T], 1 for tokens that count; None: all."""
    position_ids: torch.Tensor | None = None
    """[B, T] positions restarting at 0 at each packed document; None: 0..T-1."""
    signal: LogitSignal | None = None
    """The teacher's logit signal; None: none (no KD)."""
    clone: CloneActivations | None = None
    """The teacher's activations; None: none (no clone loss)."""
    sequence_index: torch.Tensor | None = None
    """[B] the sequences' indices in the cache (int64, on the host)."""

    @classmethod
    def from_fields(cls, fields: Mapping[str, torch.Tensor]) -> Batch:
        """The batch of a cache's fields stacked per sequence ([B, *field shape], plus `sequence_index`)."""
        return cls(fields["input_ids"], position_ids=fields.get("position_ids"), signal=_logit_signal(fields),
                   clone=clone_activations(fields), sequence_index=fields.get("sequence_index"))  # fmt: skip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """This batch with every tensor on `device` (`sequence_index` stays on the host)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """This batch with its host tensors in pinned memory, so a copy to a GPU overlaps compute."""
        return self._map(lambda t: t.pin_memory() if t.device.type == "cpu" else t)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        names = [f.name for f in dataclasses.fields(self) if f.name != "sequence_index"]
        return dataclasses.replace(self, **{name: _map_tensors(getattr(self, name), fn) for name in names})


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor in it (tensors, dicts and dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value)})  # fmt: skip
    return value


def _logit_signal(fields: Mapping[str, torch.Tensor]) -> LogitSignal | None:
    """The logit signal a cache holds (`cache.logit_mode`), None for logit_mode=none."""
    if "hidden" in fields:
        return HiddenSignal(fields["hidden"])
    if "topk_ids" in fields:
        return TopKSignal(fields["topk_ids"], fields["topk_logprobs"])
    if "sampled_ids" in fields:
        return SampledSignal(fields["sampled_ids"], fields["sampled_counts"])
    return None


def clone_activations(fields: Mapping[str, torch.Tensor]) -> CloneActivations | None:
    """The activations a cache holds (`cache.activation_mode`), with their sink flags and keep mask, from
    its fields stacked per sequence; None for activation_mode=none."""
    if "act_positions" not in fields:
        return None
    if "act_input" in fields:
        acts = {"input": fields["act_input"], "attn": fields["act_attn"]}
    else:
        acts = {m: fields[f"act_{m}"] for m in CLONE_TERMS}
    present_B = fields["act_present"].reshape(-1).bool() if "act_present" in fields else None
    layer_mask_BLP = fields["act_layer_mask"].bool() if "act_layer_mask" in fields else None
    position_ids_BT = fields.get("position_ids")
    return CloneActivations.build(fields["act_positions"], acts, position_ids_BT, present_B, layer_mask_BLP)


def logit_field_names(field_names: Iterable[str]) -> list[str]:
    """The fields of `field_names` a batch needs without its activations (the token ids and the logit
    signal)."""
    return [name for name in field_names if not name.startswith("act_")]
