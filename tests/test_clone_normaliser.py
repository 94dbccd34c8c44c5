"""Clone normalisers that cannot collapse (issue 26): sink rows and the other rows normalised apart.

A naive reference for `clone_loss` with `sink_BP`, and the bad batches of a cache whose sinks carry
massive activations: batches with no sink row for a layer, a quarter of the layers per position, and
activations on a fraction of the sequences. A clone term's scale, the loss it gives one unit of error
at every element of a layer, must stay near its scale over the whole cache with the default normaliser
(auto: the build's statistics); the batch's pooled mean square (the default before) does not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lrc_offline.batch import Batch, CloneActivations
from lrc_offline.cache.act_stats import act_layer_mask, act_present, batch_act_sums, teacher_ms
from lrc_offline.config import CLONE_TERMS, LossConfig
from lrc_offline.losses import clone_loss
from lrc_offline.student.lrc import StudentOutput
from lrc_offline.training.objective import lrc_loss

F64 = torch.float64
L, B, P = 3, 4, 5
WIDTHS = {"q": 5, "down": 4}


def _inputs(seed: int):
    """Targets whose sink rows (positions 0, and one document start) are up to 300x larger, except in layer 0
    where they are 100x smaller; a per-layer mask that leaves some layer of some sequence without its sink
    row; uneven position weights."""
    g = torch.Generator().manual_seed(seed)
    sink = torch.zeros(B, P, dtype=torch.bool)
    sink[:, 0] = True
    sink[1, 3] = True
    student, target = {}, {}
    for term, width in WIDTHS.items():
        row_scale = torch.where(sink, 300.0, 1.0).to(F64) * (1 + torch.rand(L, B, P, generator=g, dtype=F64))
        row_scale[0, sink] *= 1e-4
        target[term] = torch.randn(L, B, P, width, generator=g, dtype=F64) * row_scale[..., None]
        noise = torch.randn(L, B, P, width, generator=g, dtype=F64) * (1 + 20 * (torch.rand(L, B, P, width, generator=g) > 0.8))
        student[term] = (target[term] + noise).requires_grad_(True)
    mask = torch.rand(L, B, P, generator=g) > 0.3
    mask[1, :, 0] = False  # layer 1 holds no position-0 sink: only sequence 1's document start, if kept
    mask[2, 3] = False  # sequence 3 carries nothing in layer 2
    weights = torch.where(sink, 2.0, 1.0).to(F64) * (0.5 + torch.rand(B, P, generator=g, dtype=F64))
    return student, target, mask, weights, sink


def _naive(student, target, mask, pos_w, sink, term_w, reduce, loss_fn, delta, target_ms, eps=1e-6):
    """Loops over every element: per layer, each class's mean square (the sinks' at least the others'), then
    each row in its class's units."""
    total, weight_sum = 0.0, 0.0
    for term, s in student.items():
        t, w_term, width = target[term], term_w.get(term, 1.0), s.shape[-1]
        weight_sum += w_term
        for layer in range(L):
            ms = {}
            for cls in (True, False):
                den, sq = 0.0, 0.0
                for b in range(B):
                    for p in range(P):
                        if bool(sink[b, p]) == cls:
                            w = float(mask[layer, b, p]) * float(pos_w[b, p])
                            den += w * width
                            sq += w * sum(t[layer, b, p, j].item() ** 2 for j in range(width))
                if target_ms is not None:
                    ms[cls] = target_ms[term][layer, 0 if cls else 1].item()
                else:
                    ms[cls] = sq / den if den > 0 else 0.0
                ms[cls] = max(ms[cls], eps)
            ms[True] = max(ms[True], ms[False])  # a sink row never weighs more than another row
            num, den = 0.0, 0.0
            for b in range(B):
                for p in range(P):
                    w = float(mask[layer, b, p]) * float(pos_w[b, p])
                    row_ms = ms[bool(sink[b, p])]
                    for j in range(width):
                        den += w
                        x = (s[layer, b, p, j] - t[layer, b, p, j]) / row_ms**0.5
                        if loss_fn == "mse":
                            e = x**2
                        else:
                            e = x**2 if abs(x.item()) <= delta else 2 * delta * x.abs() - delta**2
                        num = num + w * e
            total = total + w_term * (num / den if den > 0 else 0.0)
    return total / (L * weight_sum) if reduce == "mean" else total


@pytest.mark.parametrize("loss_fn", ["mse", "huber"])
@pytest.mark.parametrize("fixed_ms", [False, True])
def test_sinks_apart_matches_naive(loss_fn, fixed_ms):
    student, target, mask, pos_w, sink = _inputs(0)
    term_w = {"q": 2.0, "down": 0.5}
    ms = {t: torch.tensor([[0.2, 1.5], [2e5, 0.7], [5e4, 3.0]], dtype=F64) for t in WIDTHS} if fixed_ms else None
    for reduce in ("mean", "sum"):
        total, per_term = clone_loss(student, target, mask, term_w, reduce=reduce, position_weights_BP=pos_w,
                                     target_ms=ms, loss_fn=loss_fn, huber_delta=1.5, sink_BP=sink)  # fmt: skip
        ref = _naive(student, target, mask, pos_w, sink, term_w, reduce, loss_fn, 1.5, ms)
        torch.testing.assert_close(total, ref, rtol=1e-10, atol=1e-12)
        got = torch.autograd.grad(total, list(student.values()))
        want = torch.autograd.grad(ref, list(student.values()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert set(per_term) == set(WIDTHS)


def test_sinks_apart_edge_cases():
    student, target, mask, _, sink = _inputs(1)
    # No sink row at all: the same as pooling the other rows.
    no_sink = mask & ~sink
    apart, _ = clone_loss(student, target, no_sink, sink_BP=sink)
    pooled, _ = clone_loss(student, target, no_sink)
    torch.testing.assert_close(apart, pooled, rtol=1e-12, atol=0)
    # Nothing valid: exactly zero, gradient included.
    none = torch.zeros(B, P, dtype=torch.bool)
    total, per_term = clone_loss(student, target, none, sink_BP=sink)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in per_term.values())
    assert all(bool((g == 0).all()) for g in torch.autograd.grad(total, list(student.values())))
    # sink_BP only matters with normalize.
    raw_apart, _ = clone_loss(student, target, mask, normalize=False, sink_BP=sink)
    raw, _ = clone_loss(student, target, mask, normalize=False)
    assert torch.equal(raw_apart, raw)
    with pytest.raises(ValueError, match=r"target_ms\['q'\].*\(3, 2\)"):
        clone_loss(student, target, mask, target_ms={"q": torch.ones(L, dtype=F64)}, sink_BP=sink)
    with pytest.raises(ValueError, match="sink_BP"):
        clone_loss(student, target, mask, sink_BP=sink[:, :2])


def test_a_sink_row_does_not_rescale_the_others():
    """The gradient a non-sink row's error gets changes with a sink row's presence only by the count of
    rows (the mean), never by the sink's magnitude; pooled, it is divided by that magnitude (in layers 1
    and 2, where the sinks are massive)."""
    student, target, mask, _, sink = _inputs(2)
    mask = torch.ones(L, B, P, dtype=torch.bool)
    without = mask & ~sink[None]
    counts = mask.sum((1, 2)).to(F64) / without.sum((1, 2))  # per layer: rows with / rows without the sinks
    for apart, expect_ratio in ((True, counts), (False, None)):
        kw = {"sink_BP": sink} if apart else {}
        g_with = torch.autograd.grad(clone_loss(student, target, mask, **kw)[0], student["down"])[0]
        g_without = torch.autograd.grad(clone_loss(student, target, without, **kw)[0], student["down"])[0]
        ratio_L = (g_without[:, ~sink] / g_with[:, ~sink]).flatten(1)
        if apart:
            torch.testing.assert_close(ratio_L, expect_ratio[:, None].expand_as(ratio_L), rtol=1e-9, atol=0)
        else:
            assert bool((ratio_L[1:] > 1e3).all())  # the sinks' 300^2 mean square left the normaliser


# ---------------------------------------------------------------------------------------------------
# the scale of a clone term on the bad batches of a cache
# ---------------------------------------------------------------------------------------------------

NUM_SEQ, SEQ_LEN, NUM_POS, NUM_LAYERS, WIDTH, BATCH = 64, 32, 8, 8, 64, 4
MASSIVE = {"down": (2, 5)}
"""term -> the layers whose sinks carry massive activations (300x the RMS: a mean square 9e4 times the
other rows', as SmolLM2-135M's down projection shows at its sink), as a teacher writes them."""


def _cache(act_fraction: float, layer_fraction: float, start_all_layers: bool) -> dict:
    """A whole cache of teacher targets [L, N, P, W] with its positions, document starts, activation budget
    and per-position layer subset, drawn the way a cache build draws them (`cache.act_stats`)."""
    g = torch.Generator().manual_seed(26)
    positions = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(SEQ_LEN - 1, generator=g)
                                        [: NUM_POS - 1].sort().values + 1]) for _ in range(NUM_SEQ)])  # fmt: skip
    # A second document starts at the third stored position of every fourth sequence; the teacher attends
    # across documents, so it is flagged as a sink but carries no massive activation.
    position_ids = torch.arange(SEQ_LEN).repeat(NUM_SEQ, 1)
    for n in range(0, NUM_SEQ, 4):
        start = int(positions[n, 2])
        position_ids[n, start:] = torch.arange(SEQ_LEN - start)
    row_scale = torch.exp(0.3 * torch.randn(NUM_LAYERS, NUM_SEQ, NUM_POS, generator=g))
    acts = {}
    for term in ("q", "down"):
        scale = row_scale.clone()
        for layer in MASSIVE.get(term, ()):
            scale[layer, :, 0] = 300.0
        if term == "q":
            scale[:, :, 0] *= 0.7  # sinks a little smaller than the other rows, as SmolLM2's q
        acts[term] = torch.randn(NUM_LAYERS, NUM_SEQ, NUM_POS, WIDTH, generator=g) * scale[..., None]
    present = torch.tensor([act_present(7, n, act_fraction) for n in range(NUM_SEQ)])
    starts = positions == 0
    layer_mask = torch.stack([act_layer_mask(7, n, NUM_LAYERS, NUM_POS, layer_fraction,
                                             starts[n] if start_all_layers else None) for n in range(NUM_SEQ)])  # fmt: skip
    return {"acts": acts, "positions": positions, "position_ids": position_ids, "present": present,
            "layer_mask": layer_mask}  # fmt: skip


def _batch(cache: dict, rows: slice) -> Batch:
    acts = {m: cache["acts"]["q" if m != "down" else "down"][:, rows].transpose(0, 1) for m in CLONE_TERMS}
    clone = CloneActivations.build(cache["positions"][rows], acts, cache["position_ids"][rows],
                                   cache["present"][rows], cache["layer_mask"][rows])  # fmt: skip
    return Batch(input_ids=torch.zeros(acts["q"].shape[0], SEQ_LEN, dtype=torch.long), clone=clone)


class _UnitError:
    """A stand-in student whose clone activations are the targets plus +-1 at every element of one layer, so
    a term's loss is exactly its scale there: the mean over the layer's rows of 1 / (the row's normaliser)."""

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(self, input_ids, *, teacher_acts, teacher_ms=None, **_):
        targets = {m: teacher_acts[m].transpose(0, 1).double() for m in CLONE_TERMS}
        signs = torch.ones_like(targets["q"][0])
        signs[..., 1::2] = -1.0
        acts = {}
        for m, t in targets.items():
            acts[m] = t.clone()
            acts[m][self.layer] += signs
        out = StudentOutput(torch.zeros(*input_ids.shape, 2), acts=acts, targets=targets)
        if teacher_ms is not None:
            out.target_ms = teacher_ms
        return out


def _scales(batch: Batch, cfg: LossConfig, term: str, stats_ms) -> torch.Tensor:
    """[L] the term's scale at each layer on `batch` (0 where the batch holds no row of that layer)."""
    cfg = dataclasses.replace(cfg, kd_weight=0.0, beta=0.0, alpha=1.0, clone_terms={m: float(m == term) for m in CLONE_TERMS})
    return torch.stack([lrc_loss(_UnitError(layer), batch, cfg, teacher_ms=stats_ms)[0] * NUM_LAYERS
                        for layer in range(NUM_LAYERS)]).detach()  # fmt: skip


BAD_CACHES = {
    # A quarter of the layers per position, the sequence start not kept in every layer (caches built before
    # it was): batches whose rows of some layer hold no sink.
    "layers25-old": (1.0, 0.25, False),
    "layers25": (1.0, 0.25, True),
    "budget25": (0.25, 1.0, True),  # activations on a quarter of the sequences
    "budget50-layers25-old": (0.5, 0.25, False),
}


def _worst_factor(cache: dict, cfg: LossConfig) -> tuple[float, bool]:
    """The largest factor, over batches, layers and terms, between a term's scale on a batch and over the
    whole cache; and whether some batch lacks a sink row for a layer it has rows of."""
    stats = batch_act_sums(cache["acts"], cache["positions"] == 0, cache["present"])
    stats_ms = {m: v.double() for m, v in teacher_ms(stats).items()}
    stats_ms = {m: stats_ms["q" if m != "down" else "down"] for m in CLONE_TERMS}
    whole = _batch(cache, slice(None))
    worst, sinkless = 1.0, False
    for term in ("q", "down"):
        ref_L = _scales(whole, cfg, term, stats_ms)
        for start in range(0, NUM_SEQ, BATCH):
            batch = _batch(cache, slice(start, start + BATCH))
            keep_LBP = batch.clone.keep_LBP
            has_rows_L = keep_LBP.any(dim=(1, 2))
            if not bool(has_rows_L.any()):  # no sequence of the batch carries activations
                continue
            sinkless |= bool((has_rows_L & ~(keep_LBP & batch.clone.sink_BP).any(dim=(1, 2))).any())
            got_L = _scales(batch, cfg, term, stats_ms)
            factor_L = torch.maximum(got_L / ref_L, ref_L / got_L)[has_rows_L]
            worst = max(worst, float(factor_L.max()))
    return worst, sinkless


@pytest.mark.parametrize("name", list(BAD_CACHES))
def test_default_clone_scale_stays_near_the_whole_cache(name):
    cache = _cache(*BAD_CACHES[name])
    default, sinkless = _worst_factor(cache, LossConfig())  # auto, given the build's statistics
    assert default <= 2.0, f"{name}: the default normaliser scales a batch's clone term {default:.2f}x"
    assert sinkless == name.endswith("-old")
    if sinkless:  # the bad batch: pooled, a sink's absence multiplies the other rows' weight
        pooled, _ = _worst_factor(cache, LossConfig(clone_normalize="batch"))
        assert pooled > 100.0, f"{name}: {pooled:.1f}x"


def test_auto_is_cache_with_statistics_and_batch_without():
    cache = _cache(1.0, 0.25, True)
    batch = _batch(cache, slice(0, BATCH))
    stats = batch_act_sums(cache["acts"], cache["positions"] == 0, cache["present"])
    stats_ms = {m: teacher_ms(stats)["q" if m != "down" else "down"].double() for m in CLONE_TERMS}
    student = _UnitError(layer=2)

    def loss(mode, ms):
        return lrc_loss(student, batch, LossConfig(clone_normalize=mode, kd_weight=0.0, beta=0.0), teacher_ms=ms)[0]

    torch.testing.assert_close(loss("auto", stats_ms), loss("cache", stats_ms), rtol=0, atol=0)
    torch.testing.assert_close(loss("auto", None), loss("batch", None), rtol=0, atol=0)
    assert not torch.isclose(loss("auto", stats_ms), loss("auto", None))
