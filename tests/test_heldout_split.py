"""The cache's held-out split: built with the training shards, evaluated in stage 2 from the cache alone."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrc_offline import losses
from lrc_offline.cache import HELDOUT, CacheReader, Manifest, inspect_cache, verify_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import CacheConfig, LossConfig
from lrc_offline.data import load_documents, pack_documents, split_heldout
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.heldout import (CacheHeldout, evaluate_heldout, heldout_metrics, heldout_results,
                                          heldout_sums, student_head_fn)  # fmt: skip
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.objective import lrc_loss
from lrc_offline.training.reader import collate

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=16, max_sequences=12, sequences_per_shard=4, topk=8, num_draws=16, act_positions=4,
             heldout_docs=4, heldout_sequences=6, logprob_dtype="float32", act_dtype="float32")  # fmt: skip


@pytest.fixture(scope="module")
def llama():
    return load_teacher("tiny-random:llama")


def _heldout_fields(cache: Path) -> dict[str, torch.Tensor]:
    """Every field of every held-out shard, read with the cache reader."""
    reader = CacheReader(cache, split=HELDOUT)
    shards = [reader.read_shard(i) for i in range(reader.num_shards)]
    return {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


def _trainer_batch(cache: Path):
    """The held-out sequences as the training reader batches them."""
    fields = _heldout_fields(cache)
    num = len(fields["input_ids"])
    return collate([{name: t[i] for name, t in fields.items()} | {"sequence_index": i} for i in range(num)])


def test_stage2_reads_only_the_cache(tmp_path):
    docs = load_documents("tiny-text")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cache = tmp_path / "cache"
    build_cache(CacheConfig(corpus=str(corpus), heldout_docs=4, seq_len=32, max_sequences=16, sequences_per_shard=8,
                            topk=8, act_positions=8), cache, progress=False)  # fmt: skip
    corpus.unlink()  # stage 2 must not need it
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "lrc_offline.cli.train", "train", "--cache", str(cache), "--out",
                           str(run), "--no-progress", "train.steps=4", "train.batch_size=4", "train.log_every=2",
                           "train.eval_every=2", "student.hidden_size=16"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    held = [r for r in read_metrics(run / "metrics.jsonl") if "heldout_ce" in r]
    assert [r["step"] for r in held] == [0, 2, 4]
    for record in held:
        assert record["heldout_ce"] > 0 and record["heldout_kl"] > 0 and 0 <= record["heldout_top1"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout_kl"] == held[-1]["heldout_kl"] and summary["heldout_top1"] == held[-1]["heldout_top1"]
    card = (run / "student" / "README.md").read_text()
    assert f"KL(teacher || student) {held[-1]['heldout_kl']:.4f}" in card
    # an exported student on the cache's held-out split: no corpus, no teacher forward
    out = subprocess.run([sys.executable, "-m", "lrc_offline.cli.train", "eval", "--student", str(run / "student"),
                          "--cache", str(cache), "--json"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout)
    assert abs(metrics["student_ce"] - held[-1]["heldout_ce"]) < 1e-4
    assert abs(metrics["kl"] - held[-1]["heldout_kl"]) < 1e-4
    assert abs(metrics["top1_agreement"] - held[-1]["heldout_top1"]) < 1e-6


def test_heldout_split_is_the_packed_heldout_documents_verified_and_listed(tmp_path, llama, capsys):
    cache = tmp_path / "c"
    cfg = CacheConfig(**SMALL)
    reports = [build_cache(cfg, cache, shard_index=w, num_workers=2, progress=False, teacher=llama) for w in (0, 1)]
    assert [r.heldout_built for r in reports] == [[0], [1]]  # split between workers like the training shards
    manifest = Manifest.from_dict(json.loads((cache / "manifest.json").read_text()))
    assert (manifest.heldout.num_sequences, manifest.heldout.num_shards, manifest.heldout.activations) == (6, 2, False)
    # the same packing as the in-memory packer over the held-out documents; no activations by default
    _, held_docs = split_heldout(load_documents("tiny-text"), cfg.heldout_docs)
    packed = pack_documents(held_docs, llama.tokenizer, cfg.seq_len, cfg.heldout_sequences)
    fields = _heldout_fields(cache)
    assert torch.equal(fields["input_ids"], packed.input_ids)
    assert torch.equal(fields["position_ids"], packed.position_ids)
    assert sorted(fields) == ["input_ids", "position_ids", "topk_ids", "topk_logprobs"]
    # the top-k signal is the teacher's on those sequences
    logprobs = torch.log_softmax(llama.model(input_ids=packed.input_ids.long()).logits, -1)
    torch.testing.assert_close(fields["topk_logprobs"], logprobs.topk(cfg.topk, -1).values, rtol=0, atol=1e-5)
    # a rerun skips them; verify checks them; inspect lists them
    again = build_cache(cfg, cache, progress=False, teacher=llama)
    assert again.heldout_built == [] and again.heldout_skipped == [0, 1]
    assert verify_cache(cache).heldout_complete == [0, 1]
    assert inspect_cache(cache)["heldout"]["sequences"] == 6
    assert cache_main(["inspect", str(cache)]) == 0 and "held-out split    6 sequences" in capsys.readouterr().out
    chunks = sorted((cache / "shards" / "heldout-00001.zarr").rglob("*"))
    target = next(f for f in chunks if f.is_file() and "c" in f.parts)
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    report = verify_cache(cache)
    assert not report.ok and list(report.heldout_bad) == [1] and report.bad == {}
    assert cache_main(["verify", str(cache)]) == 1 and "BAD     held-out shard 1" in capsys.readouterr().out
    # a held-out shard without its record is a crashed build's: clean removes it, a build makes it again
    (cache / "shards" / "heldout-00000.done.json").unlink()
    assert verify_cache(cache).heldout_missing == [0]
    assert cache_main(["clean", str(cache)]) == 0 and not (cache / "shards" / "heldout-00000.zarr").exists()
    assert build_cache(cfg, cache, progress=False, teacher=llama).heldout_built == [0]


def test_heldout_activations_are_optional(tmp_path, llama):
    build_cache(CacheConfig(**SMALL, heldout_activations=True), tmp_path / "c", progress=False, teacher=llama)
    fields = _heldout_fields(tmp_path / "c")
    assert {"act_positions", "act_input", "act_attn"} <= set(fields) and fields["act_input"].abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_from_a_hidden_cache_equals_the_kl_from_the_teachers_forward(tmp_path, llama, temperature):
    build_cache(CacheConfig(**SMALL, logit_mode="hidden", activation_mode="none"), tmp_path / "c", progress=False,
                teacher=llama)  # fmt: skip
    student = LRCStudent(llama.model, 16, seed=0)
    cached = evaluate_heldout(student_head_fn(student), CacheHeldout(tmp_path / "c"), 4, temperature=temperature,
                              chunk_tokens=20)  # fmt: skip
    ids = _heldout_fields(tmp_path / "c")["input_ids"].long()
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits_BTV, llama.model(input_ids=ids).logits
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert abs(cached["kl"] - losses.kl_full(s_logits, t_logits, mask, temperature).item()) < 1e-5
    reference = heldout_metrics(lambda x: student(x).logits_BTV, ids, 4,
                                teacher_fn=lambda x: llama.model(input_ids=x).logits)  # fmt: skip
    assert abs(cached["ce"] - reference["ce"]) < 1e-5 and abs(cached["top1"] - reference["top1_agreement"]) < 1e-12


@pytest.mark.parametrize("logit_mode", ["topk", "sampled"])
def test_kl_from_a_topk_or_sampled_cache_is_the_kd_the_trainer_computes(tmp_path, llama, logit_mode):
    build_cache(CacheConfig(**SMALL, logit_mode=logit_mode, activation_mode="none"), tmp_path / "c", progress=False,
                teacher=llama)  # fmt: skip
    student = LRCStudent(llama.model, 16, seed=0)
    cached = evaluate_heldout(student_head_fn(student), CacheHeldout(tmp_path / "c"), 4, chunk_tokens=20)
    batch = _trainer_batch(tmp_path / "c")
    with torch.no_grad():
        logits = student(batch.input_ids.long()).logits_BTV
        _, parts = lrc_loss(student, batch, LossConfig(alpha=0.0))
    mask = torch.ones_like(batch.input_ids, dtype=torch.bool)
    kd = losses.kl_topk if logit_mode == "topk" else losses.kd_sampled
    signal = (batch.signal.ids, batch.signal.logprobs if logit_mode == "topk" else batch.signal.counts)
    assert abs(cached["kl"] - kd(logits, *signal, mask).item()) < 1e-5
    assert abs(cached["kl"] - parts["kd"].item()) < 1e-5
    if logit_mode == "topk":
        teacher_top1 = batch.signal.ids[..., 0]
    else:  # the most-drawn id
        teacher_top1 = batch.signal.ids.gather(-1, batch.signal.counts.argmax(-1, keepdim=True)).squeeze(-1)
    assert abs(cached["top1"] - (logits.argmax(-1) == teacher_top1).double().mean().item()) < 1e-12


def test_two_ranks_sum_to_one(tmp_path, llama):
    build_cache(CacheConfig(**(SMALL | {"heldout_sequences": 7})), tmp_path / "c", progress=False, teacher=llama)
    heldout = CacheHeldout(tmp_path / "c")
    assert heldout.num_sequences == 7  # 2 shards of 4: rank 0 reads [0, 3), rank 1 [3, 7) across the boundary
    calls = []
    student = LRCStudent(llama.model, 16, seed=0)
    inner = student_head_fn(student)

    def head_fn(ids):
        calls.append(len(ids))
        return inner(ids)

    one = heldout_sums(head_fn, heldout, batch_size=2)
    parts = []
    for rank in (0, 1):
        calls.clear()
        parts.append(heldout_sums(head_fn, heldout, batch_size=2, rank=rank, world_size=2, collective=True))
        assert len(calls) == 2  # ceil(ceil(7 / 2) / 2): a sharded forward is collective, every rank runs as many
    # the same sums (to fp32 rounding: the forwards see other batch compositions), the same counts exactly
    torch.testing.assert_close(parts[0] + parts[1], one, rtol=1e-6, atol=0.0)
    counts = [1, 3, 4, 5]
    assert [p[5].item() for p in parts] == [3, 4] and torch.equal((parts[0] + parts[1])[counts], one[counts])
    two, single = heldout_results(parts[0] + parts[1], True), heldout_results(one, True)
    assert single["sequences"] == 7 and all(math.isclose(two[k], single[k], rel_tol=1e-6) for k in single)


def _as_built_before_heldout_splits(cache: Path) -> None:
    """Rewrite a cache as a version without held-out splits wrote it: no heldout section or config keys,
    no held-out shards, records under that manifest's digest."""
    path = cache / "manifest.json"
    data = json.loads(path.read_text())
    del data["heldout"]
    for key in ("heldout_sequences", "heldout_activations"):
        del data["config"][key]
    path.write_text(json.dumps(data, indent=2))
    digest = Manifest.from_dict(data).digest()
    for entry in (cache / "shards").iterdir():
        if entry.name.startswith("heldout-"):
            subprocess.run(["rm", "-rf", str(entry)], check=True)
        elif entry.name.endswith(".done.json"):
            entry.write_text(json.dumps(json.loads(entry.read_text()) | {"manifest": digest}))


def test_a_cache_without_a_heldout_split_trains_from_its_corpus_with_a_warning(tmp_path, llama, caplog):
    cache = tmp_path / "c"
    cfg = CacheConfig(**SMALL)
    build_cache(cfg, cache, progress=False, teacher=llama)
    _as_built_before_heldout_splits(cache)
    assert verify_cache(cache).ok and inspect_cache(cache)["heldout"] is None
    with caplog.at_level(logging.WARNING):
        report = build_cache(cfg, cache, progress=False, teacher=llama)  # completing it keeps it as it was
    assert report.built == [] and report.heldout_built == [] and "before caches stored a held-out split" in caplog.text
    caplog.clear()
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert train_main(["train", "--cache", str(cache), "--out", str(run), "--no-progress", "train.steps=2",
                           "train.batch_size=4", "train.log_every=1", "student.hidden_size=16"]) == 0  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "has no held-out split" in r.getMessage()]
    assert len(warnings) == 1 and "rebuild the cache" in warnings[0] and "\n" not in warnings[0]
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["heldout_ce"] > 0 and "heldout_kl" not in last  # text from the corpus: no cached signal
