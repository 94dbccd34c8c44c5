"""The training step's levers (issue 18): the fused, chunked head + loss equals the full-logits losses
and never holds a [B, T, V] tensor; weights generated once per optimizer step give the per-micro-batch
losses and gradients; `train.compile`; no host read-back in the step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lrc_offline import losses
from lrc_offline.batch import Batch, CloneActivations, FullLogits, HiddenSignal, SampledSignal, TopKSignal
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, LossConfig, OptimConfig, StudentConfig, TrainConfig, TrainJobConfig
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.training import loop
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.objective import lrc_loss
from lrc_offline.training.trainer import train_from_cache

B, T, S, V, D, K = 3, 9, 5, 37, 6, 7


def _signals(gen: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """One teacher signal of every logit mode (fp64), as `fused_head_loss` keywords."""
    logprobs = torch.log_softmax(3 * torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    top_values, top_ids = logprobs.topk(K, -1)
    sampled_ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    counts = torch.randint(0, 5, (B, T, K), generator=gen).double()
    sampled_ids[0, 0, -2:], counts[0, 0, -2:] = -1, 0  # padding
    return {
        "logits": {"teacher_logits_BTV": 2 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)},
        "hidden": {"teacher_hidden_BTD": torch.randn(B, T, D, generator=gen, dtype=torch.float64),
                   "teacher_head_VD": torch.randn(V, D, generator=gen, dtype=torch.float64)},  # fmt: skip
        "topk": {"topk_ids_BTK": top_ids, "topk_logprobs_BTK": top_values},
        "sampled": {"sampled_ids_BTN": sampled_ids, "sampled_counts_BTN": counts},
        "none": {},
    }


def _reference_kd(mode: str, logits, signal: dict, mask, tau: float):
    if mode == "logits":
        return losses.kl_full(logits, signal["teacher_logits_BTV"], mask, tau)
    if mode == "hidden":
        return losses.kl_from_hidden(logits, signal["teacher_hidden_BTD"], signal["teacher_head_VD"], mask, tau)
    if mode == "topk":
        return losses.kl_topk(logits, signal["topk_ids_BTK"], signal["topk_logprobs_BTK"], mask, tau)
    if mode == "sampled":
        return losses.kd_sampled(logits, signal["sampled_ids_BTN"], signal["sampled_counts_BTN"], mask, tau)
    return None


@pytest.mark.parametrize("mode", ["logits", "hidden", "topk", "sampled", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.0), (0.0, 1.0), (0.6, 0.3)])
def test_fused_head_loss_equals_the_full_logits_losses(mode, temperature, weights):
    gen = torch.Generator().manual_seed(0)
    signal = _signals(gen)[mode]
    kd_weight, beta = weights
    hidden = torch.randn(B, T, S, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V, S, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 0] = False

    logits = hidden @ head.T
    kd = _reference_kd(mode, logits, signal, mask, temperature)
    ce = losses.cross_entropy_next(logits, ids, mask)
    reference = beta * ce + (kd_weight * kd if kd is not None else 0.0)
    ref_grads = torch.autograd.grad(reference, (hidden, head))

    for chunk in (1, 4, 1000):
        h2, w2 = hidden.detach().requires_grad_(), head.detach().requires_grad_()
        total, kd2, ce2 = losses.fused_head_loss(h2, w2, ids, mask, kd_weight, beta, temperature, chunk, **signal)
        (1.7 * total).backward()
        torch.testing.assert_close(total, reference, rtol=1e-10, atol=1e-12)
        if beta > 0:  # a part with weight 0 is not computed
            torch.testing.assert_close(ce2, ce.detach(), rtol=1e-10, atol=1e-12)
        if kd is not None and kd_weight > 0:
            torch.testing.assert_close(kd2, kd.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h2.grad, 1.7 * ref_grads[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(w2.grad, 1.7 * ref_grads[1], rtol=1e-10, atol=1e-12)


def test_fused_head_loss_all_masked_is_zero_with_zero_gradients():
    hidden = torch.randn(2, 4, S, requires_grad=True)
    head = torch.randn(V, S, requires_grad=True)
    ids = torch.randint(0, V, (2, 4))
    total, kd, ce = losses.fused_head_loss(hidden, head, ids, torch.zeros(2, 4, dtype=torch.bool), chunk_tokens=3,
                                           teacher_logits_BTV=torch.randn(2, 4, V))  # fmt: skip
    total.backward()
    assert total.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
    assert not hidden.grad.any() and not head.grad.any()


# ---- through the student ------------------------------------------------------------------------------


def _batch(teacher, mode: str, gen: torch.Generator, batch: int = 3, tokens: int = 12) -> Batch:
    vocab, layers = teacher.config.vocab_size, teacher.config.num_hidden_layers
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen)
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)
    attention_mask[0, -3:] = 0
    positions = torch.stack([torch.randperm(tokens, generator=gen)[:4] for _ in range(batch)])
    with torch.no_grad():
        result = teacher(input_ids=ids, output_hidden_states=True)
    logprobs = torch.log_softmax(result.logits, -1)
    if mode == "logits":
        signal = FullLogits(result.logits)
    elif mode == "hidden":
        signal = HiddenSignal(result.hidden_states[-1])
    elif mode == "topk":
        top_logprobs, top_ids = logprobs.topk(8, -1)
        signal = TopKSignal(top_ids, top_logprobs)
    else:
        draws = torch.multinomial(logprobs.exp().view(-1, vocab), 16, replacement=True, generator=gen)
        signal = SampledSignal(draws.view(batch, tokens, 16), torch.ones(batch, tokens, 16))
    h = torch.stack([result.hidden_states[i] for i in range(layers)], 1)
    h = h.gather(2, positions[:, None, :, None].expand(-1, layers, -1, teacher.config.hidden_size))
    attn = torch.randn(h.shape, generator=gen) * 0.1
    clone = CloneActivations.build(positions, {"input": h, "attn": attn})
    return Batch(ids, attention_mask=attention_mask, signal=signal, clone=clone)


def _grads(student) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return grads


def _assert_close_dicts(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for key in a:
        scale = b[key].abs().max()
        assert (a[key] - b[key]).abs().max() <= rtol * scale + 1e-7, (key, a[key], b[key])


@pytest.mark.parametrize("mode", ["logits", "hidden", "topk", "sampled"])
def test_fused_objective_equals_the_unfused_objective(teacher, mode):
    gen = torch.Generator().manual_seed(1)
    batch = _batch(teacher, mode, gen)
    student = LRCStudent(teacher, 24, seed=2)
    cfg = LossConfig(alpha=0.5, temperature=2.0 if mode == "logits" else 1.0)
    results = []
    for chunk in (None, 5):
        loss, parts = lrc_loss(student, batch, cfg, chunk_tokens=chunk)
        loss.backward()
        results.append((parts, _grads(student)))
    _assert_close_dicts(results[1][0], results[0][0])
    _assert_close_dicts(results[1][1], results[0][1])


@pytest.mark.parametrize("chunk", [None, 7])
def test_weights_generated_once_per_step_give_the_same_losses_and_gradients(teacher, chunk):
    """Three micro-batches against detached generated weights, one backward into P: the same parts and
    parameter gradients as generating the weights in every micro-batch's forward."""
    gen = torch.Generator().manual_seed(4)
    batches = [_batch(teacher, "topk", gen) for _ in range(3)]
    student = LRCStudent(teacher, 24, seed=5)
    cfg = LossConfig(alpha=0.5)

    per_micro = []
    for batch in batches:
        loss, parts = lrc_loss(student, batch, cfg, chunk_tokens=chunk)
        (loss / 3).backward()
        per_micro.append(parts)
    reference = _grads(student)

    generated = student(generate_weights=True)
    leaves = generated.detached()
    once = []
    for batch in batches:
        loss, parts = lrc_loss(student, batch, cfg, weights=leaves, chunk_tokens=chunk)
        (loss / 3).backward()
        once.append(parts)
    assert all(p.grad is None for p in student.parameters())  # the micro-batches touch no parameter
    generated.backward(leaves)
    for a, b in zip(once, per_micro):
        _assert_close_dicts(a, b, rtol=1e-6)
    _assert_close_dicts(_grads(student), reference)


@pytest.mark.parametrize("once", [False, True])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(teacher, once):
    """Layers that keep only their input and recompute the rest (generated weights included) in the
    backward: the same parts and gradients, with weights generated in the forward or once per step."""
    gen = torch.Generator().manual_seed(6)
    batch = _batch(teacher, "topk", gen)
    cfg = LossConfig(alpha=0.5, o_space="student")
    results = []
    for checkpointing in (False, True):
        student = LRCStudent(teacher, 24, seed=7)
        student.checkpoint_layers(checkpointing)
        generated = student(generate_weights=True) if once else None
        leaves = generated.detached() if once else None
        loss, parts = lrc_loss(student, batch, cfg, weights=leaves, chunk_tokens=5)
        loss.backward()
        if once:
            generated.backward(leaves)
        results.append((parts, _grads(student)))
    assert set(results[0][0]) >= {"clone/o", "clone/down", "kd"}
    _assert_close_dicts(results[1][0], results[0][0], rtol=1e-6)
    _assert_close_dicts(results[1][1], results[0][1], rtol=1e-6)


def test_activation_checkpointing_keeps_a_fraction_of_the_tensors_for_the_backward(teacher):
    """What autograd keeps for the backward of a forward with clone activations, plus, with checkpointing,
    each layer's input [B, T, S] that the checkpoint holds instead (its generated weights and
    activations are recomputed in the backward)."""
    ids = torch.randint(0, teacher.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(8))
    kept = {}
    for checkpointing in (False, True):
        student = LRCStudent(teacher, 32, seed=1)
        student.checkpoint_layers(checkpointing)
        total = [0]

        def pack(tensor, total=total):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            student(ids, clone_positions_BP=torch.arange(8).expand(2, -1))
        kept[checkpointing] = total[0]
    kept[True] += student.num_layers * ids.numel() * 32 * 4  # the layers' inputs, fp32
    assert kept[True] < 0.25 * kept[False], kept


def test_low_precision_weights_accumulate_their_gradients_in_fp32(teacher):
    student = LRCStudent(teacher, 24, seed=5).to(torch.bfloat16)
    generated = student(generate_weights=True)
    leaves = generated.detached()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 8))
    for _ in range(2):
        student(ids, weights=leaves).logits_BTV.float().square().mean().backward()
    q = leaves.layers[0]["q"]
    assert q.grad is None and q.grad_fp32.dtype == torch.float32
    generated.backward(leaves)
    assert all(p.grad is not None for p in student.parameters())


# ---- through the loop ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("step-cache") / "cache"
    cfg = CacheConfig(teacher="tiny-random:llama", corpus="tiny-text", seq_len=32, max_sequences=24,
                      sequences_per_shard=8, act_positions=8)  # fmt: skip
    build_cache(cfg, root, progress=False)
    return root


def _job(**train) -> TrainJobConfig:
    train = {"steps": 3, "batch_size": 2, "grad_accum": 3, "log_every": 1, **train}
    return TrainJobConfig(student=StudentConfig(init="random"), loss=LossConfig(alpha=0.5),
                          optim=OptimConfig(lr=1e-2, warmup_steps=0), train=TrainConfig(**train))  # fmt: skip


def _losses(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in read_metrics(out / "metrics.jsonl")]


def _assert_runs_close(a: list[dict], b: list[dict], rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, value in rb.items():
            assert ra[key] == pytest.approx(value, rel=rtol, abs=1e-7), (ra["step"], key)


def test_loop_levers_keep_the_losses(cache, tmp_path):
    """Three steps of grad_accum 3: weights generated per micro-batch with full logits (the old step),
    generated once per step, and fused with the head: the same metrics lines to fp32 rounding."""
    runs = {}
    for name, train in {"old": dict(generate_once=False, loss_chunk_tokens=0),
                        "once": dict(generate_once=True, loss_chunk_tokens=0),
                        "fused": dict(generate_once=True, loss_chunk_tokens=5)}.items():  # fmt: skip
        train_from_cache(_job(**train), cache, tmp_path / name, progress=False)
        runs[name] = _losses(tmp_path / name)
    _assert_runs_close(runs["once"], runs["old"])
    _assert_runs_close(runs["fused"], runs["old"])


@pytest.mark.parametrize("skip_spikes", [0.0, 4.0])
def test_step_reads_nothing_back_to_the_host(cache, tmp_path, monkeypatch, skip_spikes):
    """No `.item()`, `bool()`, `float()`, `int()` or `.tolist()` of a tensor inside lrc_offline's code
    during `step` (each would wait for the device on CUDA); the log step's `_record` reads the parts.
    The cache reader's own reads are of host tensors, before the batch is copied to the device. With the
    spike guard on, the CPU's optimizer (not fused) reads the guard's flag once a step; a fused one (CUDA)
    takes it on the device (`test_spikes.py`)."""
    calls = []

    def spy(patch: pytest.MonkeyPatch, name: str) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            filename = frame.f_code.co_filename
            if "lrc_offline" in filename and not filename.endswith(os.path.join("training", "reader.py")):
                calls.append(f"{name} at {filename}:{frame.f_lineno}")
            return original(self, *args, **kwargs)

        patch.setattr(torch.Tensor, name, wrapper)

    original_step = loop.step

    def spied_step(run, index):
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
                spy(patch, name)
            return original_step(run, index)

    monkeypatch.setattr(loop, "step", spied_step)
    job = _job(steps=2)
    job.optim.skip_spikes = skip_spikes
    train_from_cache(job, cache, tmp_path / "run", progress=False)
    guard = [call for call in calls if call.startswith("__bool__") and os.path.join("training", "spikes.py") in call]
    assert len(guard) == (2 if skip_spikes else 0)
    assert [call for call in calls if call not in guard] == []


@pytest.mark.parametrize("chunk", [0, 8])
def test_compile_gives_the_same_losses(cache, tmp_path, chunk):
    pytest.importorskip("torch._inductor")
    job = dict(steps=2, grad_accum=1, loss_chunk_tokens=chunk)
    train_from_cache(_job(**job), cache, tmp_path / "eager", progress=False)
    train_from_cache(_job(compile=True, **job), cache, tmp_path / "compiled", progress=False)
    _assert_runs_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4)


# ---- memory ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from lrc_offline.batch import Batch, TopKSignal
    from lrc_offline.config import LossConfig
    from lrc_offline.student.lrc import LRCStudent
    from lrc_offline.training.objective import lrc_loss

    vocab, batch, tokens, budget_mb, chunk = (int(a) for a in sys.argv[1:6])
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = LRCStudent(teacher, 8)
    ids = torch.randint(0, vocab, (batch, tokens))
    topk_batch = Batch(ids, signal=TopKSignal(torch.randint(0, vocab, (batch, tokens, 4)),
                                              torch.full((batch, tokens, 4), -2.0)))
    size_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
    limit = size_kb * 1024 + budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        loss, _ = lrc_loss(student, topk_batch, LossConfig(), chunk_tokens=chunk or None)
        loss.backward()
    except (MemoryError, RuntimeError) as error:
        print("OUT OF MEMORY", type(error).__name__)
        sys.exit(3)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.parameters())
    print("OK", float(loss))
""")


def _step_under_limit(tmp_path, vocab: int, batch: int, tokens: int, budget_mb: int, chunk: int):
    script = tmp_path / "memory_step.py"
    script.write_text(_MEMORY_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(script), str(vocab), str(batch), str(tokens), str(budget_mb), str(chunk)]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


def test_fused_step_runs_where_the_full_logits_do_not_fit(tmp_path):
    """Full logits of 1.1 GB (fp32): the fused step runs within 600 MB more than the process had before
    the step; the full-logits step under the same limit runs out of memory."""
    vocab, batch, tokens = 32768, 4, 2048
    fused = _step_under_limit(tmp_path, vocab, batch, tokens, 600, 256)
    assert fused.returncode == 0 and "OK" in fused.stdout, fused.stdout + fused.stderr
    full = _step_under_limit(tmp_path, vocab, batch, tokens, 600, 0)
    assert full.returncode == 3 and "OUT OF MEMORY" in full.stdout, full.stdout + full.stderr


@pytest.mark.slow
def test_fused_step_at_8gb_of_logits_runs_in_2gb(tmp_path):
    """Full logits of 8.6 GB (vocabulary 131072 x 16384 tokens, fp32): the fused step runs within 1.5 GB
    more than the process had before the step."""
    result = _step_under_limit(tmp_path, 131072, 8, 2048, 1536, 256)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
