"""Training from the cache: equals online LRC, resumes exactly, splits shards across ranks, refuses bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrc_offline.batch import Batch
from lrc_offline.cache import CacheReader
from lrc_offline.cache.records import record_path
from lrc_offline.capture.build import build_cache
from lrc_offline.config import (
    CacheConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TrainConfig,
    TrainJobConfig,
)
from lrc_offline.online import teacher_batch
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training import checkpoint as ckpt
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.objective import lrc_loss
from lrc_offline.training.optim import build_optimizer
from lrc_offline.training.reader import (
    CacheDataset,
    ReaderStateError,
    collate,
    iter_batches,
)
from lrc_offline.training.trainer import TeacherMismatchError, train_from_cache

SEQ_LEN, NUM_SEQ, PER_SHARD = 32, 48, 8


def _build(root: Path, activation_mode: str) -> Path:
    # Every position at every layer, full-precision hidden states and activations (not the compact
    # defaults): the cache then carries the whole teacher signal.
    cfg = CacheConfig(
        teacher="tiny-random:llama", corpus="tiny-text", seq_len=SEQ_LEN, max_sequences=NUM_SEQ,
        sequences_per_shard=PER_SHARD, logit_mode="hidden", activation_mode=activation_mode,
        act_positions=SEQ_LEN, act_dtype="float32", act_layer_fraction=1.0,
    )  # fmt: skip
    build_cache(cfg, root, progress=False)
    return root


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("caches")
    return {mode: _build(base / mode, mode) for mode in ("residual", "targets")}


def _job(steps: int, **train) -> TrainJobConfig:
    # The paper's random init: these tests follow the loop, not the init. The batch normaliser: the online
    # trainer has no recorded statistics, so its default (auto) normalises by the batch; the cache's default
    # uses the cache's statistics, and the two are compared here on the same objective.
    return TrainJobConfig(
        student=StudentConfig(init="random"),
        loss=LossConfig(clone_normalize="batch"),
        optim=OptimConfig(lr=1e-2, warmup_steps=2),
        train=TrainConfig(steps=steps, batch_size=4, log_every=1, **train),
    )


def _online_batch(teacher_model, input_ids: torch.Tensor) -> Batch:
    """The batch the online trainer builds: full teacher logits and all seven targets at every position."""
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
    return teacher_batch(teacher_model, input_ids.long(), positions)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max() + 1e-7)


# ---- equivalence with online LRC ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["residual", "targets"])
def test_cache_batch_gives_online_loss_and_gradients(caches, mode):
    teacher = load_teacher("tiny-random:llama")
    samples = list(CacheReader(caches[mode]).iter_sequences(shards=[1]))[:4]
    cached = collate(samples)
    online = _online_batch(teacher.model, cached.input_ids)
    results = []
    for batch in (cached, online):
        student = LRCStudent(teacher.model, 32, seed=3)
        loss, parts = lrc_loss(student, batch, LossConfig())
        loss.backward()
        results.append((parts, {n: p.grad for n, p in student.named_parameters()}))
    (parts_c, grads_c), (parts_o, grads_o) = results
    assert set(parts_c) == set(parts_o) and {"kd", "ce", "clone", "clone/q", "clone/down"} <= set(parts_c)
    for key in parts_o:
        assert _close(parts_c[key], parts_o[key]), (key, parts_c[key], parts_o[key])
    assert parts_o["kd"] > 0.01  # a real teacher signal, not a trivially equal zero
    for name, grad in grads_o.items():
        assert grad.abs().max() > 0, name
        assert _close(grads_c[name], grad), name


def test_a_cache_built_with_the_old_defaults_still_trains_with_todays(tmp_path):
    """The defaults before the compact codec, named: fp32 log-probs, bf16 residuals at every layer, 16 positions."""
    old = CacheConfig(seq_len=SEQ_LEN, max_sequences=8, sequences_per_shard=8, heldout_docs=2, heldout_sequences=4,
                      logprob_dtype="float32", act_dtype="bfloat16", act_layer_fraction=1.0,
                      act_positions=16)  # fmt: skip
    build_cache(old, tmp_path / "cache", progress=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert {f["name"]: f["dtype"] for f in manifest["fields"]}["act_input"] == "bfloat16"
    assert "act_layer_mask" not in {f["name"] for f in manifest["fields"]}
    job = TrainJobConfig(student=StudentConfig(pca_calibrate_sequences=2), train=TrainConfig(steps=2, batch_size=4))
    summary = train_from_cache(job, tmp_path / "cache", tmp_path / "run", progress=False)
    ran = json.loads((tmp_path / "run" / "config.json").read_text())
    assert ran["student"]["init"] == "pca" and ran["optim"]["warmup_steps"] == 1  # today's auto choices
    assert summary["student_heldout"]["ce"] > 0 and torch.isfinite(torch.tensor(summary["student_heldout"]["ce"]))


def test_three_trainer_steps_match_online_steps(caches, tmp_path):
    cfg = _job(3)
    train_from_cache(cfg, caches["residual"], tmp_path, progress=False)
    logged = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]

    # The same three batches, teacher signal from a teacher forward, updated as the online trainer does.
    teacher = load_teacher("tiny-random:llama")
    student = LRCStudent(teacher.model, cfg.student.hidden_size, cfg.student.init_std, cfg.student.seed)
    optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.train.steps)
    batches = iter_batches(CacheDataset(caches["residual"], seed=cfg.train.seed), cfg.train.batch_size)
    online = []
    for _ in range(3):
        loss, _ = lrc_loss(student, _online_batch(teacher.model, next(batches).input_ids), cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        online.append(loss.item())
    assert logged == pytest.approx(online, rel=1e-5)
    saved = load_file(tmp_path / "checkpoints" / "step-000003" / "student.safetensors")
    for name, p in student.named_parameters():
        assert _close(saved[name], p.detach(), rtol=1e-4), name
    assert (tmp_path / "student" / "config.json").is_file()
    info = json.loads((tmp_path / "student" / "lrc_config.json").read_text())
    assert info["cache_fingerprints"]["teacher_weights"].startswith("sha256:")


# ---- exact resume --------------------------------------------------------------------------------------


@pytest.fixture
def seen(monkeypatch) -> list[list[int]]:
    """Sequence indices each CacheDataset iteration hands out, one list per `iter()`."""
    runs: list[list[int]] = []
    original = CacheDataset.__iter__

    def recording(self):
        runs.append([])
        for sample in original(self):
            runs[-1].append(sample["sequence_index"])
            yield sample

    monkeypatch.setattr(CacheDataset, "__iter__", recording)
    return runs


def test_killed_run_resumes_with_same_losses_and_no_repeated_sequence(caches, tmp_path, seen):
    cfg = _job(NUM_SEQ // 4, checkpoint_every=4)  # exactly one epoch
    train_from_cache(cfg, caches["residual"], tmp_path / "full", progress=False)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    (order,) = seen
    assert sorted(order) == list(range(NUM_SEQ))

    killed = train_from_cache(cfg, caches["residual"], tmp_path / "b", progress=False,
                              max_steps_this_run=6)  # fmt: skip
    assert killed["stopped_early"] and ckpt.latest_checkpoint(tmp_path / "b").name == "step-000004"
    resumed = train_from_cache(cfg, caches["residual"], tmp_path / "b", progress=False)
    assert resumed["start_step"] == 4
    _, before_kill, after_resume = seen
    assert len(before_kill) == 24 and len(after_resume) == NUM_SEQ - 16
    # Steps 5-6 were lost with the kill: their sequences are read again, all others exactly once.
    assert before_kill[:16] + after_resume == order
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for a, b in zip(full, records):
        for key in ("loss", "kd", "ce", "clone", "clone/o", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)

    changed = _job(NUM_SEQ // 4)
    changed.loss.alpha = 0.2
    with pytest.raises(ckpt.CheckpointError, match="loss.alpha"):
        train_from_cache(changed, caches["residual"], tmp_path / "b", progress=False)
    with pytest.raises(ckpt.CheckpointError, match="resume='never'"):
        train_from_cache(cfg, caches["residual"], tmp_path / "b", progress=False, resume="never")
    state_file = ckpt.latest_checkpoint(tmp_path / "b") / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "version": 99}))
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        train_from_cache(cfg, caches["residual"], tmp_path / "b", progress=False)


def test_a_run_that_skips_spikes_resumes_with_the_same_skips(caches, tmp_path):
    """A guard tight enough to skip ordinary steps: the resumed run skips the same steps as the whole one."""
    cfg = _job(24, checkpoint_every=14)
    cfg.optim.skip_spikes, cfg.optim.spike_window = 1.05, 10
    train_from_cache(cfg, caches["residual"], tmp_path / "full", progress=False)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    skipped = [r["skipped_steps"] for r in full]
    assert skipped[:10] == [0] * 10 and 0 < skipped[-1] < 14, skipped  # skips after ten steps, not every step
    train_from_cache(cfg, caches["residual"], tmp_path / "b", progress=False, max_steps_this_run=17)
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "b") / "state.json").read_text())
    assert state["extra"]["spike_guard"]["seen"] == 14 and len(state["extra"]["spike_guard"]["norms"]) == 10
    train_from_cache(cfg, caches["residual"], tmp_path / "b", progress=False)
    resumed = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in resumed] == skipped
    for a, b in zip(full, resumed):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    exported = json.loads((tmp_path / "b" / "student" / "lrc_config.json").read_text())
    assert "spike_guard" not in json.dumps(exported)  # the guard's window is the checkpoint's, not the model's


def test_reader_state_resumes_exactly_and_refuses_a_mismatch(caches):
    dataset = CacheDataset(caches["residual"], seed=5, num_epochs=2)
    stream = iter(dataset)
    head = [next(stream)["sequence_index"] for _ in range(NUM_SEQ + 11)]  # into the second epoch
    state = dataset.state_dict()
    rest = [s["sequence_index"] for s in stream]
    again = CacheDataset(caches["residual"], seed=5, num_epochs=2)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [s["sequence_index"] for s in again] == rest
    assert sorted(head[:NUM_SEQ]) == sorted(head[NUM_SEQ:] + rest) == list(range(NUM_SEQ))
    assert head[:NUM_SEQ] != head[NUM_SEQ:] + rest  # each epoch has its own order
    with pytest.raises(ReaderStateError, match="world_size"):
        CacheDataset(caches["residual"], rank=0, world_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ReaderStateError, match="version"):
        again.load_state_dict({**state, "version": 0})
    with pytest.raises(ReaderStateError, match="cache"):
        CacheDataset(caches["targets"], seed=5).load_state_dict(state)


# ---- ranks and workers -----------------------------------------------------------------------------------


def test_two_ranks_read_every_sequence_once(caches):
    ranks = [CacheDataset(caches["residual"], rank=r, world_size=2, seed=1, num_epochs=1) for r in range(2)]
    assert ranks[0].shards == [0, 2, 4] and ranks[1].shards == [1, 3, 5]
    read = [[s["sequence_index"] for s in dataset] for dataset in ranks]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == list(range(NUM_SEQ))
    for dataset, indices in zip(ranks, read):
        assert {i // PER_SHARD for i in indices} == set(dataset.shards)


def test_dataloader_workers_read_every_sequence_once(caches):
    dataset = CacheDataset(caches["residual"], seed=1, num_epochs=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate)
    indices = torch.cat([batch.sequence_index for batch in loader]).tolist()
    assert sorted(indices) == list(range(NUM_SEQ))


@pytest.mark.slow
def test_torchrun_two_processes(caches, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from lrc_offline.config import TrainConfig, TrainJobConfig
        from lrc_offline.training.reader import CacheDataset
        from lrc_offline.training.trainer import train_from_cache
        seen = []
        original = CacheDataset.__iter__
        def recording(self):
            for sample in original(self):
                seen.append(sample["sequence_index"])
                yield sample
        CacheDataset.__iter__ = recording
        cfg = TrainJobConfig(train=TrainConfig(steps=6, batch_size=4, log_every=1, device="cpu"))
        train_from_cache(cfg, {str(caches["residual"])!r}, {str(tmp_path / "out")!r}, progress=False)
        with open({str(tmp_path)!r} + f"/seen-{{os.environ['RANK']}}.json", "w") as f:
            json.dump(seen, f)
    """))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    subprocess.run(torchrun, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = [json.loads((tmp_path / f"seen-{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 24 and sorted(seen[0] + seen[1]) == list(range(NUM_SEQ))
    assert len(read_metrics(tmp_path / "out" / "metrics.jsonl")) == 6


@pytest.mark.slow
def test_ddp_weights_generated_once_per_step_equal_per_micro_batch(caches, tmp_path):
    """Two processes under DDP with gradient accumulation 2: generating the student's weights once per
    optimizer step (P's gradient reduced once) trains like generating them per micro-batch."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from lrc_offline.config import OptimConfig, StudentConfig, TrainConfig, TrainJobConfig
        from lrc_offline.training.trainer import train_from_cache
        cfg = TrainJobConfig(student=StudentConfig(init="random"), optim=OptimConfig(lr=1e-2, warmup_steps=2),
                             train=TrainConfig(steps=4, batch_size=2, grad_accum=2, log_every=1, device="cpu",
                                               generate_once=sys.argv[1] == "once", checkpoint_every=0))
        train_from_cache(cfg, {str(caches["residual"])!r}, sys.argv[2], progress=False)
    """))
    runs = {}
    for mode in ("once", "per-micro-batch"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), mode,
                   str(tmp_path / mode)]  # fmt: skip
        subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs[mode] = read_metrics(tmp_path / mode / "metrics.jsonl")
    assert len(runs["once"]) == len(runs["per-micro-batch"]) == 4
    for once, per in zip(runs["once"], runs["per-micro-batch"]):
        assert once["loss"] == pytest.approx(per["loss"], rel=1e-5, abs=1e-6)
        assert once["grad_norm"] == pytest.approx(per["grad_norm"], rel=1e-4)


# ---- refusals and partial caches -----------------------------------------------------------------------


def test_cache_of_another_teacher_is_refused_before_any_step(caches, tmp_path):
    cfg = TrainJobConfig(teacher="tiny-random:mistral", train=TrainConfig(steps=2, batch_size=4))
    with pytest.raises(TeacherMismatchError, match="tiny-random:llama") as err:
        train_from_cache(cfg, caches["residual"], tmp_path / "out", progress=False)
    assert "tiny-random:mistral" in str(err.value) and "teacher_weights" in str(err.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

    # Same architecture, one weight changed: only the weights fingerprint tells them apart.
    modified = load_teacher("tiny-random:llama")
    with torch.no_grad():
        modified.model.model.layers[1].mlp.up_proj.weight[0, 0] += 0.5
    modified.model.save_pretrained(tmp_path / "llama-b")
    modified.tokenizer.save_pretrained(tmp_path / "llama-b")
    with pytest.raises(TeacherMismatchError, match="teacher_weights") as err:
        train_from_cache(_job(2), caches["residual"], tmp_path / "out", progress=False,
                         teacher=str(tmp_path / "llama-b"))  # fmt: skip
    assert "llama-b" in str(err.value) and "tiny-random:llama" in str(err.value)


def test_incomplete_shard_is_skipped_and_reported(caches, tmp_path, caplog):
    partial = tmp_path / "partial"
    shutil.copytree(caches["residual"], partial)
    record_path(partial, 2).unlink()
    with caplog.at_level(logging.WARNING, logger="lrc_offline.training.reader"):
        summary = train_from_cache(_job(2), partial, tmp_path / "out", progress=False)
    assert summary["skipped_shards"] == [2] and summary["sequences_per_epoch"] == NUM_SEQ - PER_SHARD
    assert "1 of 6 shards are incomplete" in caplog.text
    read = [s["sequence_index"] for s in CacheDataset(partial, num_epochs=1)]
    assert sorted(read) == [i for i in range(NUM_SEQ) if not 16 <= i < 24]
