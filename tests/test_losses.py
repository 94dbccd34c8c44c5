"""Losses against naive references written as explicit loops over tokens and vocab, in float64.

Shape suffixes: B batch, T tokens, V vocab, K top-k, N sampled ids, L layers, P positions, W width,
D hidden size.
"""

from __future__ import annotations

import math

import pytest
import torch

from lrc_offline.losses import (
    clone_loss,
    cross_entropy_next,
    kd_sampled,
    kl_from_hidden,
    kl_full,
    kl_topk,
)

B, T, V, D = 2, 5, 7, 4
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _partial_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


# --- naive references: one token, one vocab entry at a time ------------------------------------------


def _naive_log_softmax(row, temperature):
    scaled = [row[v] / temperature for v in range(len(row))]
    log_z = torch.log(sum(torch.exp(s) for s in scaled))
    return [s - log_z for s in scaled]


def _naive_token_mean(per_token, mask):
    """per_token(b, t) -> scalar; mean over valid tokens, 0 when none."""
    terms = [per_token(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=F64)


def naive_kl(student, teacher, mask, temperature=1.0):
    def per_token(b, t):
        log_q = _naive_log_softmax(student[b, t], temperature)
        log_p = _naive_log_softmax(teacher[b, t], temperature)
        total = 0.0
        for v in range(student.shape[-1]):
            p = math.exp(log_p[v].item())
            if p > 0:
                total = total + p * (log_p[v].item() - log_q[v])
        return total

    return _naive_token_mean(per_token, mask)


def naive_kl_topk(student, ids, logprobs, mask, temperature=1.0):
    def per_token(b, t):
        log_q = _naive_log_softmax(student[b, t], temperature)
        total, p_mass, q_mass = 0.0, 0.0, 0.0
        for k in range(ids.shape[-1]):
            lp, i = logprobs[b, t, k].item(), int(ids[b, t, k])
            total = total + math.exp(lp) * (lp - log_q[i])
            p_mass += math.exp(lp)
            q_mass = q_mass + torch.exp(log_q[i])
        p_tail = max(1.0 - p_mass, 0.0)
        if p_tail > 0:
            total = total + p_tail * (math.log(p_tail) - torch.log(1.0 - q_mass))
        return total

    return _naive_token_mean(per_token, mask)


def naive_kd_sampled(student, ids, counts, mask, temperature=1.0):
    def per_token(b, t):
        log_q = _naive_log_softmax(student[b, t], temperature)
        num_draws = sum(int(c) for c in counts[b, t])
        total = 0.0
        for n in range(ids.shape[-1]):
            if counts[b, t, n] > 0:
                frac = int(counts[b, t, n]) / num_draws
                total = total + frac * (math.log(frac) - log_q[int(ids[b, t, n])])
        return total

    return _naive_token_mean(per_token, mask)


def naive_ce_next(logits, input_ids, mask):
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                terms.append(-_naive_log_softmax(logits[b, t], 1.0)[int(input_ids[b, t + 1])])
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=F64)


def naive_clone(student_acts, targets, mask, weights, normalize, reduce, eps=1e-6):
    total, weight_sum, num_layers = 0.0, 0.0, None
    for term, s in student_acts.items():
        w = weights.get(term, 1.0)
        if w == 0:
            continue
        t = targets[term]
        num_layers, _, _, width = s.shape
        weight_sum += w
        for layer in range(num_layers):
            sq_err, sq_tgt, count = 0.0, 0.0, 0
            for b in range(s.shape[1]):
                for p in range(s.shape[2]):
                    if not (mask[layer, b, p] if mask.dim() == 3 else mask[b, p]):
                        continue
                    for j in range(width):
                        sq_err = sq_err + (s[layer, b, p, j] - t[layer, b, p, j]) ** 2
                        sq_tgt += t[layer, b, p, j].item() ** 2
                        count += 1
            mse = sq_err / count
            if normalize:
                mse = mse / max(sq_tgt / count, eps)
            total = total + w * mse
    return total / (num_layers * weight_sum) if reduce == "mean" else total


# --- full-vocab KL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_full_matches_naive(temperature):
    g = _gen(0)
    student = _leaf(torch.randn(B, T, V, generator=g, dtype=F64) * 2)
    teacher = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    mask = _partial_mask()
    loss = kl_full(student, teacher, mask, temperature)
    ref = naive_kl(student, teacher, mask, temperature)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=1e-10, atol=1e-12)


def test_kl_full_accepts_int_mask_and_ignores_masked_garbage():
    g = _gen(1)
    student = torch.randn(B, T, V, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    mask = _partial_mask()
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = 1e4
    noisy_teacher[~mask] = -1e4
    clean = kl_full(student, teacher, mask)
    torch.testing.assert_close(kl_full(noisy_student, noisy_teacher, mask.int()), clean, rtol=0, atol=0)


# --- KL from hidden states ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_from_hidden_equals_kl_full(chunk_tokens, temperature):
    # B*T = 10 tokens: chunks of 3, 4 and 7 leave a short last chunk.
    g = _gen(2)
    student = _leaf(torch.randn(B, T, V, generator=g))
    hidden = torch.randn(B, T, D, generator=g).requires_grad_(True)
    weight = torch.randn(V, D, generator=g)
    mask = _partial_mask()
    loss = kl_from_hidden(student, hidden, weight, mask, temperature, chunk_tokens=chunk_tokens)
    ref = kl_full(student, hidden.detach() @ weight.T, mask, temperature)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=1e-6, atol=1e-8)
    # The teacher side gets no gradient even when its tensor asks for one.
    kl_from_hidden(student, hidden, weight, mask, temperature, chunk_tokens=chunk_tokens).backward()
    assert hidden.grad is None and student.grad is not None


def test_kl_from_hidden_matches_naive_float64():
    g = _gen(3)
    student = _leaf(torch.randn(B, T, V, generator=g, dtype=F64))
    hidden = torch.randn(B, T, D, generator=g, dtype=F64)
    weight = torch.randn(V, D, generator=g, dtype=F64)
    mask = _partial_mask()
    loss = kl_from_hidden(student, hidden, weight, mask, temperature=1.5, chunk_tokens=3)
    ref = naive_kl(student, hidden @ weight.T, mask, temperature=1.5)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=1e-10, atol=1e-12)


def test_kl_from_hidden_bf16_inputs():
    g = _gen(4)
    student = _leaf(torch.randn(B, T, V, generator=g).bfloat16())
    hidden = torch.randn(B, T, D, generator=g).bfloat16()
    weight = torch.randn(V, D, generator=g).bfloat16()
    mask = _partial_mask()
    loss = kl_from_hidden(student, hidden, weight, mask, chunk_tokens=4)
    ref = kl_full(student, hidden @ weight.T, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    grad = _grad(loss, student)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, _grad(ref, student), rtol=0, atol=0)


# --- top-k KL ----------------------------------------------------------------------------------------


def _topk_teacher(teacher_BTV, k, temperature):
    logprobs = torch.log_softmax(teacher_BTV / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("peak", [0.0, 9.0])
def test_kl_topk_matches_naive(temperature, peak):
    # peak = 9 pushes the student's tail mass to ~1e-4 at T = 1: small but real, and computed exactly.
    g = _gen(5)
    teacher = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    ids, logprobs = _topk_teacher(teacher, 3, temperature)
    student = torch.randn(B, T, V, generator=g, dtype=F64)
    student = _leaf(student.scatter_add(-1, ids, torch.full(ids.shape, peak, dtype=F64)))
    mask = _partial_mask()
    loss = kl_topk(student, ids, logprobs, mask, temperature)
    ref = naive_kl_topk(student, ids, logprobs, mask, temperature)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kl_topk_with_k_equal_vocab_is_kl_full(temperature, dtype):
    g = _gen(6)
    student = _leaf(torch.randn(B, T, V, generator=g, dtype=dtype) * 3)
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype) * 3
    ids, logprobs = _topk_teacher(teacher, V, temperature)  # every id, sorted by teacher prob
    mask = _partial_mask()
    loss = kl_topk(student, ids, logprobs, mask, temperature)
    ref = kl_full(student, teacher, mask, temperature)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=tol, atol=tol)


def test_kl_topk_teacher_mass_entirely_in_topk():
    # The teacher puts zero mass outside its top-3, so its tail bucket is 0 and top-k KL is the full KL.
    g = _gen(7)
    k = 3
    teacher = torch.randn(B, T, V, generator=g)
    keep = torch.rand(B, T, V, generator=g).argsort(dim=-1)[..., :k]
    teacher = torch.full_like(teacher, float("-inf")).scatter(-1, keep, teacher.gather(-1, keep))
    ids, logprobs = _topk_teacher(teacher, k, 1.0)
    mask = _partial_mask()
    student = _leaf(torch.randn(B, T, V, generator=g))
    loss = kl_topk(student, ids, logprobs, mask)
    ref = kl_full(student, teacher, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=1e-6, atol=1e-7)

    # A student with all its mass on those ids (tail underflows to 0 in fp32) stays finite.
    peaked = _leaf(torch.full((B, T, V), -200.0).scatter(-1, keep, 50.0))
    loss = kl_topk(peaked, ids, logprobs, mask)
    grad = _grad(loss, peaked)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, kl_full(peaked, teacher, mask), rtol=1e-6, atol=1e-6)


def test_kl_topk_student_tail_underflow_with_teacher_tail_is_finite():
    g = _gen(8)
    teacher = torch.randn(B, T, V, generator=g)
    ids, logprobs = _topk_teacher(teacher, 2, 1.0)
    student = _leaf(torch.full((B, T, V), -300.0).scatter(-1, ids, 300.0))
    loss = kl_topk(student, ids, logprobs, _partial_mask())
    grad = _grad(loss, student)
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(grad).all()


# --- sampled KD --------------------------------------------------------------------------------------


def _compact_counts(counts_XV, width):
    """[X, V] draw counts -> unique ids padded with -1 and their counts, each [X, width]."""
    top = counts_XV.topk(width, dim=-1)
    ids = torch.where(top.values > 0, top.indices, -1)
    return ids, top.values


def test_kd_sampled_matches_naive():
    g = _gen(9)
    n = 4
    student = _leaf(torch.randn(B, T, V, generator=g, dtype=F64))
    p = torch.softmax(torch.randn(B * T, V, generator=g), dim=-1)
    draws = torch.multinomial(p, n, replacement=True, generator=g)
    counts = torch.zeros(B * T, V, dtype=torch.int32).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
    ids, counts = _compact_counts(counts, n)
    ids, counts = ids.reshape(B, T, n), counts.reshape(B, T, n)
    assert (ids == -1).any(), "the fixture should exercise padding"
    mask = _partial_mask()
    loss = kd_sampled(student, ids, counts, mask, temperature=1.5)
    ref = naive_kd_sampled(student, ids, counts, mask, temperature=1.5)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, student), _grad(ref, student), rtol=1e-10, atol=1e-12)


def test_kd_sampled_with_exact_proportions_is_kl_full():
    # Counts exactly proportional to the teacher's probabilities: the sampled target is the teacher.
    counts = torch.tensor([6, 3, 1, 0, 0, 0, 0])
    teacher = torch.log(counts.double()).expand(B, T, V)
    ids, cnts = _compact_counts(counts.expand(B * T, V), 5)
    student = torch.randn(B, T, V, generator=_gen(10), dtype=F64)
    mask = _partial_mask()
    got = kd_sampled(student, ids.reshape(B, T, 5), cnts.reshape(B, T, 5), mask)
    torch.testing.assert_close(got, kl_full(student, teacher, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_sampled_gradient_is_unbiased(temperature):
    """Mean of the sampled-KD gradient over independent draws -> the full-KL gradient (q - p) / T.

    Each draw is N = 32 samples; each draw is one "token" of the batch, so the loss's mean over tokens
    is exactly the average gradient over draws. Per component the average has standard error
    sqrt(p (1 - p) / (32 * draws)) / T; over V = 50 ids at 4000 draws the error norm is about
    sqrt(1 / 128000) / T ~ 0.003 / T; measured 0.3% (T = 1) and 1.1% (T = 2) of the gradient norm,
    so < 5% holds with a wide margin, and 100 draws (6x larger standard error) must be visibly worse.
    A biased estimator would plateau instead of shrinking.
    """
    g = _gen(11)
    vocab, n, num_draws = 50, 32, 4000
    teacher_V = torch.randn(vocab, generator=g) * 2
    student_V = torch.randn(vocab, generator=g)
    p_V = torch.softmax(teacher_V / temperature, dim=-1)
    q_V = torch.softmax(student_V / temperature, dim=-1)
    full_grad_V = (q_V - p_V) / temperature
    # Check the target against kl_full's own gradient, so the test pins the loss's convention.
    student_full = _leaf(student_V[None, None])
    full_loss = kl_full(student_full, teacher_V[None, None], torch.ones(1, 1, dtype=torch.bool), temperature)
    torch.testing.assert_close(_grad(full_loss, student_full)[0, 0], full_grad_V, rtol=1e-5, atol=1e-7)

    draws = torch.multinomial(p_V.expand(num_draws, vocab), n, replacement=True, generator=g)
    counts = torch.zeros(num_draws, vocab).scatter_add_(1, draws, torch.ones(num_draws, n))
    ids, counts = _compact_counts(counts, n)

    def mean_grad(num):
        student = _leaf(student_V.expand(1, num, vocab))
        every = torch.ones(1, num, dtype=torch.bool)
        loss = kd_sampled(student, ids[None, :num], counts[None, :num], every, temperature)
        return _grad(loss, student)[0].sum(0)

    def rel_err(num):
        return ((mean_grad(num) - full_grad_V).norm() / full_grad_V.norm()).item()

    err_few, err_many = rel_err(100), rel_err(num_draws)
    assert err_many < 0.05, err_many
    assert err_many < 0.5 * err_few, (err_few, err_many)


# --- next-token cross-entropy ------------------------------------------------------------------------


def test_cross_entropy_next_matches_naive():
    g = _gen(12)
    logits = _leaf(torch.randn(B, T, V, generator=g, dtype=F64))
    input_ids = torch.randint(0, V, (B, T), generator=g)
    mask = _partial_mask()
    input_ids[~mask] = -100  # padding ids outside the vocab must be ignored
    loss = cross_entropy_next(logits, input_ids, mask)
    ref = naive_ce_next(logits, input_ids, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, logits), _grad(ref, logits), rtol=1e-10, atol=1e-12)


def test_cross_entropy_next_full_mask_is_shifted_ce():
    g = _gen(13)
    logits = torch.randn(B, T, V, generator=g)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    got = cross_entropy_next(logits, input_ids, torch.ones(B, T, dtype=torch.int64))
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


# --- every token loss with every token masked --------------------------------------------------------


def _all_token_losses():
    g = _gen(14)
    teacher = torch.randn(B, T, V, generator=g)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    ids, logprobs = _topk_teacher(teacher, 3, 1.0)
    sampled_ids = torch.full((B, T, 4), -1)
    sampled_counts = torch.zeros(B, T, 4, dtype=torch.int32)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    return {
        "kl_full": lambda s, m: kl_full(s, teacher, m),
        "kl_from_hidden": lambda s, m: kl_from_hidden(s, hidden, weight, m, chunk_tokens=3),
        "kl_topk": lambda s, m: kl_topk(s, ids, logprobs, m, temperature=2.0),
        "kd_sampled": lambda s, m: kd_sampled(s, sampled_ids, sampled_counts, m),
        "cross_entropy_next": lambda s, m: cross_entropy_next(s, input_ids, m),
    }


@pytest.mark.parametrize("name", list(_all_token_losses()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_masked_gives_exact_zero_and_zero_grads(name, dtype):
    loss_fn = _all_token_losses()[name]
    student = _leaf(torch.randn(B, T, V, generator=_gen(15)).to(dtype) * 100)
    loss = loss_fn(student, torch.zeros(B, T, dtype=torch.bool))
    assert loss.dtype == torch.float32
    assert loss.item() == 0.0 and loss.requires_grad
    grad = _grad(loss, student)
    assert torch.isfinite(grad).all() and (grad == 0).all()
    # The same with a 0/1 integer mask.
    assert loss_fn(student, torch.zeros(B, T, dtype=torch.int64)).item() == 0.0


@pytest.mark.parametrize("name", list(_all_token_losses()))
def test_bf16_logits_are_computed_in_fp32(name):
    loss_fn = _all_token_losses()[name]
    student_bf16 = torch.randn(B, T, V, generator=_gen(16)).bfloat16() * 8
    mask = _partial_mask()
    got = loss_fn(student_bf16, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss_fn(student_bf16.float(), mask), rtol=1e-6, atol=1e-7)


def test_bad_shapes_raise():
    student = torch.randn(B, T, V)
    with pytest.raises(ValueError, match="mask_BT"):
        kl_full(student, student, torch.ones(B, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        kl_full(student, student, torch.ones(B, T, dtype=torch.bool), temperature=0.0)


# --- clone loss --------------------------------------------------------------------------------------

L, P = 2, 3
WIDTHS = {"q": 4, "k": 2, "o": 3, "down": 5}


def _clone_inputs(seed, dtype=F64):
    g = _gen(seed)
    student, target = {}, {}
    for term, width in WIDTHS.items():
        # Targets with a different scale per term, like real projections.
        scale = 1.0 + 10.0 * torch.rand((), generator=g)
        target[term] = (torch.randn(L, B, P, width, generator=g) * scale).to(dtype)
        student[term] = _leaf((target[term].float() + torch.randn(L, B, P, width, generator=g)).to(dtype))
    mask = torch.tensor([[True, False, True], [True, True, False]])
    return student, target, mask


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_clone_loss_matches_naive(normalize, reduce):
    student, target, mask = _clone_inputs(20)
    weights = {"q": 2.0, "k": 0.0, "o": 0.5}  # "down" missing -> 1.0, "k" dropped
    total, per_term = clone_loss(student, target, mask, weights, normalize=normalize, reduce=reduce)
    ref = naive_clone(student, target, mask, weights, normalize, reduce)
    torch.testing.assert_close(total, ref, rtol=1e-12, atol=1e-12)
    for term in student:
        got = torch.autograd.grad(total, student[term], retain_graph=True, allow_unused=True)[0]
        want = torch.autograd.grad(ref, student[term], retain_graph=True, allow_unused=True)[0]
        if term == "k":
            assert got is None and want is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert set(per_term) == {"q", "o", "down"}
    assert not any(v.requires_grad for v in per_term.values())


@pytest.mark.parametrize("normalize", [True, False])
def test_clone_loss_per_layer_mask_matches_naive(normalize):
    """A [L, B, P] mask (positions carrying a subset of the layers) against the naive loop; a layer no
    position carries adds exactly 0."""
    student, target, _ = _clone_inputs(27)
    mask_LBP = torch.rand(L, B, P, generator=torch.Generator().manual_seed(3)) < 0.5
    mask_LBP[:, 0, 0] = True  # every layer carries at least one position
    weights = {"q": 2.0, "o": 0.5}
    total, _ = clone_loss(student, target, mask_LBP, weights, normalize=normalize)
    ref = naive_clone(student, target, mask_LBP, weights, normalize, "mean")
    torch.testing.assert_close(total, ref, rtol=1e-12, atol=1e-12)
    for term in ("q", "o"):
        got = torch.autograd.grad(total, student[term], retain_graph=True)[0]
        assert bool((got[~mask_LBP] == 0).all()) and bool((got[mask_LBP] != 0).all())
    # A [B, P] mask equals the same mask repeated for every layer.
    shared = mask_LBP[0]
    torch.testing.assert_close(clone_loss(student, target, shared)[0],
                               clone_loss(student, target, shared.expand(L, B, P))[0], rtol=1e-12, atol=0)
    # Layer 0 without any position: its error is 0 and the others' are unchanged (the mean still over L).
    empty = mask_LBP.clone()
    empty[0] = False
    rest = {m: v[1:] for m, v in student.items()}, {m: v[1:] for m, v in target.items()}
    got, _ = clone_loss(student, target, empty, weights)
    want, _ = clone_loss(*rest, empty[1:], weights)
    torch.testing.assert_close(got, want * (L - 1) / L, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="mask_BP"):
        clone_loss(student, target, mask_LBP[:, :, :1])


def test_clone_loss_per_term_and_reductions():
    student, target, mask = _clone_inputs(21)
    weights = {"q": 2.0, "k": 0.0, "o": 0.5}
    mean_total, per_term = clone_loss(student, target, mask, weights)
    sum_total, _ = clone_loss(student, target, mask, weights, reduce="sum")
    weight_sum = 2.0 + 0.5 + 1.0
    torch.testing.assert_close(sum_total, mean_total * L * weight_sum, rtol=1e-12, atol=0)
    # per_term is the layer mean of each term's normalised MSE, so the weighted mean rebuilds the total.
    rebuilt = (2.0 * per_term["q"] + 0.5 * per_term["o"] + per_term["down"]) / weight_sum
    torch.testing.assert_close(rebuilt, mean_total.detach(), rtol=1e-12, atol=0)
    single, _ = clone_loss({"q": student["q"]}, {"q": target["q"]}, mask)
    torch.testing.assert_close(single.detach(), per_term["q"], rtol=1e-12, atol=0)


def test_clone_loss_normalisation_is_scale_free_and_detached():
    student, target, mask = _clone_inputs(22)
    base, _ = clone_loss(student, target, mask)
    scaled, _ = clone_loss({k: v * 1000 for k, v in student.items()}, {k: v * 1000 for k, v in target.items()}, mask)
    torch.testing.assert_close(scaled, base, rtol=1e-12, atol=0)
    # Detached normaliser: the gradient is the raw-MSE gradient divided by the target's mean square.
    raw, _ = clone_loss({"q": student["q"]}, {"q": target["q"]}, mask, normalize=False)
    norm, _ = clone_loss({"q": student["q"]}, {"q": target["q"]}, mask, normalize=True)
    sel = mask[None, :, :, None].expand_as(target["q"])
    ms_t = target["q"].square()[sel].reshape(L, -1).mean(-1)  # one per layer
    want = _grad(raw, student["q"]) / ms_t[:, None, None, None]
    torch.testing.assert_close(_grad(norm, student["q"]), want, rtol=1e-12, atol=1e-15)


def test_clone_loss_ignores_masked_positions():
    student, target, mask = _clone_inputs(23)
    total, per_term = clone_loss(student, target, mask)
    noisy_student = {k: _leaf(torch.where(mask[None, :, :, None], v, 1e6)) for k, v in student.items()}
    noisy_target = {k: torch.where(mask[None, :, :, None], v, -1e6) for k, v in target.items()}
    noisy_total, noisy_terms = clone_loss(noisy_student, noisy_target, mask)
    torch.testing.assert_close(noisy_total, total, rtol=1e-12, atol=0)
    for term in student:
        torch.testing.assert_close(noisy_terms[term], per_term[term], rtol=1e-12, atol=0)
    grads = torch.autograd.grad(noisy_total, list(noisy_student.values()))
    for grad in grads:
        assert (grad[:, ~mask] == 0).all() and (grad[:, mask] != 0).all()


def test_clone_loss_mask_none_means_all_valid():
    student, target, _ = _clone_inputs(24)
    every = torch.ones(B, P, dtype=torch.int64)
    torch.testing.assert_close(clone_loss(student, target)[0], clone_loss(student, target, every)[0], rtol=0, atol=0)


def test_clone_loss_all_masked_is_exact_zero():
    student, target, _ = _clone_inputs(25, dtype=torch.float32)
    none = torch.zeros(B, P, dtype=torch.bool)
    for normalize in (True, False):
        total, per_term = clone_loss(student, target, none, normalize=normalize)
        assert total.item() == 0.0 and total.requires_grad
        assert all(v.item() == 0.0 for v in per_term.values())
        grads = torch.autograd.grad(total, list(student.values()))
        assert all(torch.isfinite(gr).all() and (gr == 0).all() for gr in grads)


def test_clone_loss_bf16_computed_in_fp32():
    student, target, mask = _clone_inputs(26, dtype=torch.bfloat16)
    total, per_term = clone_loss(student, target, mask)
    assert total.dtype == torch.float32
    upcast, _ = clone_loss({k: v.float() for k, v in student.items()}, {k: v.float() for k, v in target.items()}, mask)
    torch.testing.assert_close(total, upcast, rtol=1e-6, atol=0)
    naive = naive_clone(
        {k: v.detach().double() for k, v in student.items()}, {k: v.double() for k, v in target.items()},
        mask, {}, normalize=True, reduce="mean",
    )
    torch.testing.assert_close(total.double(), naive, rtol=1e-6, atol=0)
    assert student["q"].dtype == torch.bfloat16 and _grad(total, student["q"]).dtype == torch.bfloat16


def test_clone_loss_bad_inputs_raise():
    student, target, mask = _clone_inputs(27)
    with pytest.raises(ValueError, match="differ"):
        clone_loss(student, {k: v for k, v in target.items() if k != "q"}, mask)
    with pytest.raises(ValueError, match="positive weight"):
        clone_loss(student, target, mask, weights={k: 0.0 for k in student})
    with pytest.raises(ValueError, match="reduce"):
        clone_loss(student, target, mask, reduce="max")
    with pytest.raises(ValueError, match="mask_BP"):
        clone_loss(student, target, torch.ones(B, P + 1, dtype=torch.bool))


def test_clone_loss_gradient_reaches_a_projected_target():
    # o and down targets are P^T t: the projection learns from the target side too (the paper's loss).
    student, target, mask = _clone_inputs(23)
    proj = torch.eye(target["q"].shape[-1], dtype=target["q"].dtype, requires_grad=True)
    total, _ = clone_loss({"q": student["q"]}, {"q": target["q"] @ proj}, mask, normalize=True)
    total.backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
