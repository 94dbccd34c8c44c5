"""The build's top-k math (`topk_entropy`, through `logit_fields`) against the plain definitions: a full
log_softmax, top-k of the log-probs, -(p * log p).sum, and a float64 log_softmax for the values.

Shape suffixes: R rows, V vocab, K top-k.
"""

from __future__ import annotations

import pytest
import torch

from lrc_offline.capture import signals
from lrc_offline.capture.signals import entropy, logit_fields, logprobs_at, sampled_signal, topk_entropy, topk_signal
from lrc_offline.config import CacheConfig

R, V, K = 37, 4099, 64


def _logits(case: str, rows: int = R, vocab: int = V) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x_RV = torch.randn(rows, vocab, generator=gen)
    if case == "normal":
        return x_RV * 3
    if case == "ties":  # few distinct values: ties inside the top-k and across its boundary, and a flat row
        x_RV = (x_RV * 4).round() / 2
        x_RV[0] = 1.5
        x_RV[1, :200] = x_RV[1].max()
        return x_RV
    if case == "large":  # magnitudes where p is one-hot in fp32 and differences in x - max are large
        return x_RV * 300 + 5000
    if case == "peaked":  # one dominant token per row, the rest far below, as a confident teacher gives
        x_RV = x_RV * 2
        x_RV[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] += 25
        return x_RV
    raise AssertionError(case)


def _check(logits_RV: torch.Tensor, temperature: float, k: int) -> None:
    ids, values, tail, entropy_R = topk_entropy(logits_RV, temperature, k)
    logprobs_RV = logprobs_at(logits_RV, temperature)
    ref_ids, ref_values, ref_tail = topk_signal(logprobs_RV, k)
    assert ids.dtype == torch.int32 and ids.shape == values.shape == (logits_RV.shape[0], k)
    assert torch.equal(ids, ref_ids)
    exact_RV = torch.log_softmax((logits_RV.float() / temperature).double(), dim=-1)
    exact_values = exact_RV.gather(1, ids.long())
    torch.testing.assert_close(values.double(), exact_values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values, ref_values, rtol=2e-6, atol=2e-5)  # the plain path rounds more
    torch.testing.assert_close(tail, ref_tail, rtol=0, atol=1e-5)
    exact_entropy = -(exact_RV.exp() * exact_RV).sum(-1)
    torch.testing.assert_close(entropy_R.double(), exact_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy_R, entropy(logprobs_RV), rtol=0, atol=5e-5)


@pytest.mark.parametrize("case", ["normal", "ties", "large", "peaked"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_topk_entropy_matches_plain_path(case, temperature):
    _check(_logits(case), temperature, K)


def test_topk_entropy_chunks_and_dtypes(monkeypatch):
    """Chunk boundaries that do not divide the rows, k = vocab, and bf16 logits (the GPU teacher's)."""
    monkeypatch.setattr(signals, "CPU_CHUNK_ELEMENTS", 5 * V)
    _check(_logits("normal"), 1.0, K)
    _check(_logits("ties"), 1.0, K)
    _check(_logits("normal", vocab=50), 1.0, 50)
    _check(_logits("normal").to(torch.bfloat16), 1.0, K)
    _check(_logits("normal").to(torch.bfloat16), 1.3, K)


def test_topk_entropy_smollm2_width():
    _check(_logits("normal", rows=24, vocab=49152), 1.0, K)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_logit_fields_match_plain_path(mode):
    cfg = CacheConfig(logit_mode=mode, topk=K, num_draws=16, temperature=1.5)
    logits_BTV = torch.stack([_logits("normal"), _logits("ties")])
    fields, stats = logit_fields(cfg, logits_BTV, [3, 4])
    entropy_sum = 0.0
    for b, logits_TV in enumerate(logits_BTV):
        logprobs = logprobs_at(logits_TV, cfg.temperature)
        entropy_sum += float(entropy(logprobs).sum())
        if mode == "topk":
            ids, values, _ = topk_signal(logprobs, cfg.topk)
            assert torch.equal(fields["topk_ids"][b], ids)
            torch.testing.assert_close(fields["topk_logprobs"][b], values, rtol=2e-6, atol=2e-5)
        else:  # the draws are the plain path's, bit for bit, for the same seed
            gen = torch.Generator().manual_seed(signals.position_seed(cfg.seed + 1, 3 + b))
            ids, counts = sampled_signal(logprobs, cfg.num_draws, gen)
            assert torch.equal(fields["sampled_ids"][b], ids) and torch.equal(fields["sampled_counts"][b], counts)
    assert stats["teacher_entropy_sum"] == pytest.approx(entropy_sum, rel=1e-6)
