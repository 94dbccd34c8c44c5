"""Teacher activation statistics recorded while a cache is built, and the activation budget.

Every shard's completion record carries, under ``stats["act_stats"]``, per clone term and stored layer
the sum over its activation positions of the target's mean square (over the term's width), split into
attention-sink positions (document starts, where the teacher has massive activations) and the others,
with the position counts and the number of sequences that carry activations. Sums, not means, so the
records of shards built by different processes merge exactly. They give the clone loss fixed
normalisers, one for sink rows and one for the others (`loss.clone_normalize=cache`), and show where a
teacher's massive activations are.

The activation budget (`cache.act_fraction`) stores activations for a seeded fraction of the
sequences only; the others hold zeros (which compress to almost nothing) and ``act_present = 0``.
The per-position layer subset (`cache.act_layer_fraction`) stores, at each activation position, a
seeded subset of the layers (`act_layer_mask`), chosen so the positions of a sequence cover every
layer, and every layer at the sequence's start (position 0, the strongest attention sink); the other
layers hold zeros there. The statistics are of everything the teacher produced at the
sampled positions of the sequences that carry activations, every layer included.

Legend: L stored layers, B sequences, P positions, W width.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lrc_offline.seeding import stable_fraction

__all__ = [
    "act_present",
    "layers_per_position",
    "act_layer_mask",
    "sink_flags",
    "keep_mask",
    "batch_act_sums",
    "merge_act_sums",
    "activation_stats",
    "teacher_ms",
]


def act_present(seed: int, sequence_index: int, fraction: float) -> bool:
    """Whether sequence `sequence_index` carries activations under budget `fraction` (seeded, stable)."""
    if fraction >= 1.0:
        return True
    return stable_fraction("lrc-act-budget", seed, sequence_index) < fraction


def layers_per_position(num_layers: int, fraction: float) -> int:
    """m, the layers each activation position carries under `cache.act_layer_fraction`: ceil(f L), >= 1."""
    return max(1, math.ceil(fraction * num_layers - 1e-9))


def act_layer_mask(
    seed: int, sequence_index: int, num_layers: int, num_positions: int, fraction: float,
    start_P: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """bool [L, P]: which of the L stored layers each of the P activation positions of sequence
    `sequence_index` carries (seeded, stable).

    The layers are put in a seeded order (by ``stable_fraction("lrc-act-layers", seed, j, layer)``) and
    position p takes the next m = ceil(f L) of them, cyclically (entries p m .. p m + m - 1 mod L). So each
    position carries m distinct layers, and the positions of a sequence cover every layer once P m >= L
    (each layer then appears floor(P m / L) or one more times). The sequence's start (`start_P`, bool [P]:
    True at the position whose index is 0) carries every layer: the teacher's strongest attention sink,
    whose massive activations are the clone loss's largest targets, is cloned in every layer of every
    sequence, and a batch's per-layer normalisers always see it. Other document starts follow the rule.
    """
    if fraction >= 1.0:
        return torch.ones(num_layers, num_positions, dtype=torch.bool)
    m = layers_per_position(num_layers, fraction)
    keys = [stable_fraction("lrc-act-layers", seed, sequence_index, layer) for layer in range(num_layers)]
    order = sorted(range(num_layers), key=keys.__getitem__)
    entries_PM = (torch.arange(num_positions)[:, None] * m + torch.arange(m)) % num_layers
    mask = torch.zeros(num_layers, num_positions, dtype=torch.bool)
    mask[torch.tensor(order)[entries_PM], torch.arange(num_positions)[:, None]] = True
    if start_P is not None:
        mask[:, start_P.to(torch.bool).cpu()] = True
    return mask


def sink_flags(positions_BP: torch.Tensor, position_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, P]: which activation positions are attention sinks, the document starts (position id 0;
    without position ids, the sequence start). The cache's statistics and the clone loss's sink weight
    both count these."""
    if position_ids_BT is None:
        return positions_BP == 0
    return position_ids_BT.gather(1, positions_BP.long()) == 0


def keep_mask(
    present_B: torch.Tensor | None, layer_mask_BLP: torch.Tensor | None, num_layers: int, num_positions: int
) -> torch.Tensor | None:
    """bool [B, L, P]: the (layer, position) rows of each sequence that hold activations, those of the
    sequences the activation budget keeps (`present_B`, bool [B]) and, with a layer subset, the layers
    each position carries (`layer_mask_BLP`, bool); the other rows hold zeros. None when every row does."""
    if layer_mask_BLP is not None:
        return layer_mask_BLP if present_B is None else layer_mask_BLP & present_B[:, None, None]
    if present_B is not None:
        return present_B[:, None, None].expand(-1, num_layers, num_positions)
    return None


@torch.no_grad()
def batch_act_sums(acts: dict[str, torch.Tensor], sink_BP: torch.Tensor, present_B: torch.Tensor) -> dict[str, Any]:
    """JSON-ready sums of one batch.

    Args:
        acts: term -> [L, B, P, W] teacher targets (teacher space).
        sink_BP: bool, which positions are attention sinks.
        present_B: bool, which sequences carry activations (the others are left out).
    """
    present_BP = present_B[:, None].to(sink_BP.device).expand_as(sink_BP)
    sink, other = (present_BP & sink_BP).float(), (present_BP & ~sink_BP).float()
    terms = list(acts)
    # Every sum lands in one tensor and crosses to the host once per batch: one sync, not one per term.
    ms_TLBP = torch.stack([acts[t].float().square().mean(dim=-1) for t in terms])
    sums_2TL = torch.stack([(ms_TLBP * sink).sum(dim=(2, 3)), (ms_TLBP * other).sum(dim=(2, 3))])
    counts = torch.stack([sink.sum(), other.sum()])
    sums_2TL, counts = sums_2TL.cpu(), counts.cpu()
    return {
        "sequences": int(present_B.sum()),
        "sink_positions": int(counts[0]),
        "other_positions": int(counts[1]),
        "sink_sq": {t: sums_2TL[0, i].tolist() for i, t in enumerate(terms)},
        "other_sq": {t: sums_2TL[1, i].tolist() for i, t in enumerate(terms)},
    }


def merge_act_sums(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The sums of two disjoint sets of sequences."""
    if a is None:
        return b
    out = {key: a[key] + b[key] for key in ("sequences", "sink_positions", "other_positions")}
    for part in ("sink_sq", "other_sq"):
        out[part] = {t: [x + y for x, y in zip(a[part][t], b[part][t])] for t in a[part]}
    return out


def activation_stats(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Merge the activation sums of shard completion records (None if none carries them)."""
    merged = None
    for record in records:
        sums = record.get("stats", {}).get("act_stats")
        if sums is not None:
            merged = merge_act_sums(merged, sums)
    return merged


def teacher_ms(stats: dict[str, Any]) -> dict[str, torch.Tensor]:
    """term -> [L, 2] mean square of the teacher's targets per stored layer, at attention-sink positions
    (column 0) and at the other positions (column 1): the clone loss normalises the two classes apart.

    A class the statistics never saw (a cache sampled without its sinks) takes the other class's value;
    no batch of that cache has a row of that class to read it. The loss's weight of sink rows
    (`loss.sink_weight`) does not enter: a class's mean square is the same whatever weight its rows carry.
    """
    num_sink, num_other = stats["sink_positions"], stats["other_positions"]
    if num_sink + num_other <= 0:
        raise ValueError("the cache's activation statistics cover no position")
    out = {}
    for term, other in stats["other_sq"].items():
        sink_L = torch.tensor(stats["sink_sq"][term], dtype=torch.float64) / max(num_sink, 1)
        other_L = torch.tensor(other, dtype=torch.float64) / max(num_other, 1)
        if num_sink == 0:
            sink_L = other_L
        elif num_other == 0:
            other_L = sink_L
        out[term] = torch.stack([sink_L, other_L], dim=1).float()
    return out
