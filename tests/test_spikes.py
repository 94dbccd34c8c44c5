"""The spike guard: which steps it skips, that a skipped step moves nothing, and its checkpointed state."""

from __future__ import annotations

import math

import pytest
import torch

from lrc_offline.config import ConfigError, OptimConfig
from lrc_offline.training.spikes import MIN_HISTORY, SpikeGuard, optimizer_step


def _decisions(guard: SpikeGuard, norms: list[float]) -> list[bool]:
    return [bool(guard.check(torch.tensor(x))) for x in norms]


def _reference(norms: list[float], factor: float, window: int) -> list[bool]:
    """The rule written out: skip a non-finite norm, or one above factor x the median of the last `window`
    finite norms once MIN_HISTORY norms were seen (torch's median of an even count is the lower middle)."""
    out = []
    for i, x in enumerate(norms):
        history = [y for y in norms[max(0, i - window):i] if math.isfinite(y)]
        spike = i >= MIN_HISTORY and x > factor * sorted(history)[(len(history) - 1) // 2]
        out.append(not math.isfinite(x) or spike)
    return out


def test_the_guard_skips_spikes_and_non_finite_norms_only():
    norms = [50.0 + (i % 7) for i in range(30)] + [600.0, 52.0, float("nan"), 51.0, float("inf"), 199.0, 230.0]
    guard = SpikeGuard(4.0, 20, "cpu")
    got = _decisions(guard, norms)
    assert got == _reference(norms, 4.0, 20)
    assert [i for i, s in enumerate(got) if s] == [30, 32, 34, 36]  # 600, nan, inf and 230 > 4 x 53; 199 is not
    assert int(guard.skipped) == 4


def test_nothing_is_skipped_before_the_guard_has_seen_enough_steps():
    guard = SpikeGuard(2.0, 10, "cpu")
    early = _decisions(guard, [1.0] * (MIN_HISTORY - 1) + [100.0])
    assert early == [False] * (MIN_HISTORY - 1) + [False]  # a tenth norm is judged by nine
    assert _decisions(guard, [1e4]) == [True]


def test_a_lasting_change_of_scale_stops_being_skipped_once_it_fills_over_half_the_window():
    norms = [1.0] * 20 + [10.0] * 20
    got = _decisions(SpikeGuard(4.0, 20, "cpu"), norms)
    assert got == _reference(norms, 4.0, 20)
    assert got[20:32] == [True] * 11 + [False]  # the (lower) median of the last 20 turns to 10 after 11 of them


def test_a_reloaded_guard_decides_as_the_continued_one():
    torch.manual_seed(0)
    norms = (torch.rand(80) * 10 + 40).tolist()
    norms[45], norms[61], norms[70] = 900.0, float("nan"), 500.0
    whole = SpikeGuard(3.0, 25, "cpu")
    first = _decisions(whole, norms[:50])
    rest = _decisions(whole, norms[50:])
    for width in (25, 12):  # the same window, and a shorter one that keeps the most recent norms
        again = SpikeGuard(3.0, 25, "cpu")
        _decisions(again, norms[:50])
        reloaded = SpikeGuard(3.0, width, "cpu")
        reloaded.load_state_dict(again.state_dict())
        assert int(reloaded.skipped) == sum(first) == 1
        got = _decisions(reloaded, norms[50:])
        assert got == _reference(norms, 3.0, width)[50:]
        if width == 25:
            assert got == rest
    assert rest[11] and rest[20]  # the nan and the 500


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_step_moves_neither_the_weights_nor_the_moments(fused, monkeypatch):
    """Fused (CUDA's default, here on the CPU kernel): the flag reaches the optimizer as `found_inf`, never
    read back to the host; otherwise one read of the flag a step."""
    reads = []
    original = torch.Tensor.__bool__

    def spied_bool(self):
        reads.append(self)
        return original(self)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=fused or None)
    plain = torch.optim.AdamW(reference, lr=0.1, fused=fused or None)
    for flags in ([False, True, False, True, True, False]):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "__bool__", spied_bool)
            optimizer_step(optimizer, torch.tensor(flags))
        if not flags:  # the reference takes only the steps that were not skipped
            for p, g in zip(reference, grads):
                p.grad = g.clone()
            plain.step()
        for p, q in zip(params, reference):
            assert torch.equal(p.detach(), q.detach())
    assert not hasattr(optimizer, "found_inf")
    assert len(reads) == (0 if fused else 6)
    for p, q in zip(params, reference):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], plain.state[q][key]), key
    assert float(optimizer.state[params[0]]["step"]) == 3


def test_the_options_refuse_a_factor_that_would_skip_ordinary_steps():
    with pytest.raises(ConfigError, match="skip_spikes=0.5 must be > 1"):
        OptimConfig(skip_spikes=0.5)
    with pytest.raises(ConfigError, match="spike_window=5 must be >= 10"):
        OptimConfig(spike_window=5)
    assert OptimConfig(skip_spikes=0).skip_spikes == 0
