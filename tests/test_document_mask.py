"""cache.document_mask: the teacher sees each packed document alone, and training follows the cache.

The anchor: in a document-masked cache, the fields of a document packed second in a sequence equal those
of the same document captured on its own (token and position ids exactly; top-k ids exactly; top-k
log-probs, final hidden states and residual activations to fp32 rounding, max |diff| <= TOL), for every
tiny teacher family.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from lrc_offline import losses
from lrc_offline.batch import Batch
from lrc_offline.cache import CacheMismatchError, CacheReader, read_manifest
from lrc_offline.capture.build import build_cache
from lrc_offline.capture.vllm_backend import BackendUnavailableError, VLLMCapture
from lrc_offline.config import (BuildRunConfig, CacheConfig, ConfigError, LossConfig, StudentConfig, TrainConfig,
                                TrainJobConfig, apply_overrides)  # fmt: skip
from lrc_offline.evaluation import evaluate_export, evaluate_export_from_cache
from lrc_offline.online import teacher_batch
from lrc_offline.student.init import calibrate_head_scale
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.load import load_teacher
from lrc_offline.teacher.tiny import TINY_FAMILIES, tiny_teacher
from lrc_offline.training.heldout import CacheHeldout, evaluate_heldout, student_head_fn
from lrc_offline.training.trainer import train_from_cache

TOL = 1e-5
"""fp32: max |packed - alone| allowed for log-probs, hidden states and activations (measured: 0, bit for bit,
with the tiny teachers' eager attention; about 1e-6 with sdpa)."""

# Byte-level tiny tokenizer: a document is BOS + its bytes + EOS.
FIRST = "alpha beta gamma!"  # 19 tokens
SECOND = "the second document, seen alone"  # 33 tokens
FILLER = "filler text after the document, which causal attention keeps from reaching it. " * 2  # 164 tokens
START, LENGTH = len(FIRST) + 2, len(SECOND) + 2  # where SECOND lies when packed second, and its tokens

BUILD = dict(seq_len=64, sequences_per_shard=4, topk=8, logprob_dtype="float32", activation_mode="residual",
             act_positions=64, act_fraction=1.0, act_layer_fraction=1.0, act_dtype="float32",
             run=BuildRunConfig(batch_size=2))  # fmt: skip
"""Every position stored (act_positions >= seq_len), losslessly: the positions of SECOND match one to one."""


def _corpus(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _row0(cache: Path) -> dict[str, torch.Tensor]:
    """Every field of the cache's first sequence."""
    return {name: value[0] for name, value in CacheReader(cache).read_shard(0).items()}


def _second_doc_fields(tmp_path: Path, teacher, tag: str, **cfg) -> tuple[dict, dict]:
    """SECOND's fields packed after FIRST, and captured on its own (with the same filler after it)."""
    packed = build_cache(CacheConfig(corpus=_corpus(tmp_path / f"{tag}-packed.jsonl", [FIRST, SECOND, FILLER]),
                                     **BUILD | cfg), tmp_path / f"{tag}-packed", progress=False, teacher=teacher)
    alone = build_cache(CacheConfig(corpus=_corpus(tmp_path / f"{tag}-alone.jsonl", [SECOND, FILLER]), **BUILD | cfg),
                        tmp_path / f"{tag}-alone", progress=False, teacher=teacher)  # fmt: skip
    got, ref = _row0(Path(packed.out)), _row0(Path(alone.out))
    return ({k: _at(v, START) for k, v in got.items()}, {k: _at(v, 0) for k, v in ref.items()})


def _at(value: torch.Tensor, start: int) -> torch.Tensor:
    """SECOND's span of a per-sequence field: tokens first, or [layers, positions, width] activations."""
    if value.ndim == 3:  # act_input / act_attn: [L, P, D], P = every position
        return value[:, start : start + LENGTH]
    return value[start : start + LENGTH] if value.ndim >= 1 and len(value) == BUILD["seq_len"] else value


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_document_packed_second_equals_the_document_alone(tmp_path, family):
    teacher = load_teacher(f"tiny-random:{family}")
    got, ref = _second_doc_fields(tmp_path, teacher, "topk", document_mask=True)
    assert torch.equal(got["input_ids"], ref["input_ids"]) and ref["input_ids"][0] == teacher.tokenizer.bos_token_id
    assert torch.equal(got["position_ids"], torch.arange(LENGTH, dtype=torch.int32))
    assert torch.equal(got["position_ids"], ref["position_ids"])
    assert torch.equal(got["topk_ids"], ref["topk_ids"])
    for name in ("topk_logprobs", "act_input", "act_attn"):
        assert got[name].shape == ref[name].shape
        assert (got[name] - ref[name]).abs().max() <= TOL, name
    got, ref = _second_doc_fields(tmp_path, teacher, "hidden", document_mask=True, logit_mode="hidden",
                                  activation_mode="none")  # fmt: skip
    assert (got["hidden"] - ref["hidden"]).abs().max() <= TOL
    assert read_manifest(tmp_path / "hidden-packed").document_mask


def test_without_the_mask_the_teacher_sees_the_document_before(tmp_path):
    """The same builds without cache.document_mask: SECOND's signal depends on FIRST (what the test above
    rules out), and the position ids the cache stores still restart (they always did)."""
    got, ref = _second_doc_fields(tmp_path, load_teacher("tiny-random:llama"), "plain")
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["position_ids"], ref["position_ids"])
    assert (got["topk_logprobs"] - ref["topk_logprobs"]).abs().max() > 1e-2
    assert (got["act_attn"] - ref["act_attn"]).abs().max() > 1e-2
    assert not read_manifest(tmp_path / "plain-packed").document_mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_transformers_masks_packed_documents_by_their_position_ids(family, attn):
    """What the build relies on, in the installed `transformers`: position ids that restart, no attention
    mask and no KV cache give each document its own causal block (a KV cache turns the detection off)."""
    model = tiny_teacher(family)
    model.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, 256, (1, 7), generator=gen), torch.randint(0, 256, (1, 9), generator=gen)
    ids, positions = torch.cat([first, second], 1), torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        alone = model(input_ids=second, use_cache=False).logits[0]
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 7:]
        cached = model(input_ids=ids, position_ids=positions, use_cache=True).logits[0, 7:]
    assert (packed - alone).abs().max() <= TOL
    assert (cached - alone).abs().max() > 1e-2


def test_online_teacher_batch_follows_the_position_ids(teacher):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]] * 2)
    positions = torch.arange(12).expand(2, -1)
    batch = teacher_batch(teacher, ids, positions, position_ids)
    with torch.no_grad():
        alone = teacher(input_ids=ids[:, 5:], use_cache=False).logits
    assert (batch.signal.logits[:, 5:] - alone).abs().max() <= TOL
    assert torch.equal(batch.position_ids, position_ids)
    assert batch.clone.sink_BP[:, [0, 5]].all() and batch.clone.sink_BP.sum() == 4  # both document starts
    plain = teacher_batch(teacher, ids, positions)
    assert plain.position_ids is None and (plain.signal.logits[:, 5:] - alone).abs().max() > 1e-2


# ---- the manifest: recorded, and old caches read as unmasked -------------------------------------------


def _digest_as_old_code_wrote_it(data: dict) -> str:
    """A schema-2/3 manifest's digest (written out here): sha256 of the JSON less its volatile keys."""
    kept = {k: v for k, v in data.items() if k not in ("created", "versions", "build")}
    return "sha256:" + hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def test_a_cache_built_before_the_option_reads_as_unmasked_and_refuses_a_masked_build(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl", [FIRST, SECOND, FILLER])
    cfg = CacheConfig(corpus=corpus, **BUILD | dict(activation_mode="none"))
    cache = tmp_path / "cache"
    build_cache(cfg, cache, progress=False, teacher=load_teacher("tiny-random:llama"))
    # Rewrite it as a build before cache.document_mask left it: no such key, its records under that digest.
    data = json.loads((cache / "manifest.json").read_text())
    assert data["config"].pop("document_mask") is False
    (cache / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    for record in (cache / "shards").glob("*.done.json"):
        record.write_text(json.dumps(json.loads(record.read_text()) | {"manifest": _digest_as_old_code_wrote_it(data)}))
    reader = CacheReader(cache)
    assert reader.manifest.document_mask is False and reader.complete_shards() == [0]
    teacher = load_teacher("tiny-random:llama")
    assert build_cache(cfg, cache, progress=False, teacher=teacher).skipped == [0]  # same contract: complete
    assert json.loads((cache / "manifest.json").read_text()) == data
    with pytest.raises(CacheMismatchError, match="document_mask"):
        build_cache(CacheConfig(corpus=corpus, document_mask=True, **BUILD | dict(activation_mode="none")), cache,
                    progress=False, teacher=teacher)  # fmt: skip


def test_vllm_backend_refuses_a_document_masked_cache():
    with pytest.raises(ConfigError, match="cache.run.backend=vllm cannot capture cache.document_mask=true"):
        CacheConfig(document_mask=True, activation_mode="none", run=BuildRunConfig(backend="vllm"))
    cfg = CacheConfig(activation_mode="none", run=BuildRunConfig(backend="vllm"))
    cfg.document_mask = True  # changed after its checks: the backend refuses it before starting vLLM
    with pytest.raises(BackendUnavailableError, match="document_mask=true needs cache.run.backend=hf"):
        VLLMCapture(cfg, None, Path("."))


def test_train_document_mask_values():
    assert TrainConfig().document_mask == "auto"
    for value, expected in (("true", True), ("false", False), ("auto", "auto")):
        cfg = apply_overrides(TrainJobConfig(), [f"train.document_mask={value}"])
        assert cfg.train.document_mask == expected
    with pytest.raises(ConfigError, match="train.document_mask='yes' must be auto, true or false"):
        TrainConfig(document_mask="yes")


# ---- training and held-out evaluation follow the cache ---------------------------------------------------


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory) -> Path:
    """A document-masked top-k cache of the tiny llama with a held-out split of several documents a row."""
    root = tmp_path_factory.mktemp("masked")
    docs = [f"doc {i}: " + "w " * (2 + i % 5) for i in range(40)]  # 13 to 23 tokens: several to a row
    cfg = CacheConfig(corpus=_corpus(root / "corpus.jsonl", docs), document_mask=True, heldout_docs=12,
                      heldout_sequences=4, **BUILD | dict(act_positions=8, seq_len=48))  # fmt: skip
    build_cache(cfg, root / "cache", progress=False, teacher=load_teacher("tiny-random:llama"))
    return root / "cache"


def _job(**train) -> TrainJobConfig:
    return TrainJobConfig(student=StudentConfig(hidden_size=32, init="random"), loss=LossConfig(alpha=0.5),
                          train=TrainConfig(**dict(steps=2, batch_size=2, log_every=1, device="cpu") | train))  # fmt: skip


def _by_document(student, ids_BT: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
    """The student's logits with every packed document run as a sequence of its own, side by side."""
    rows = []
    for ids_T, pos_T in zip(ids_BT, position_ids_BT):
        starts = [*torch.nonzero(pos_T == 0).flatten().tolist(), len(pos_T)]
        rows.append(torch.cat([student(ids_T[None, a:b].long()).logits_BTV[0] for a, b in zip(starts, starts[1:])]))
    return torch.stack(rows)


def test_heldout_of_a_masked_cache_is_evaluated_one_document_at_a_time(masked_cache):
    """The held-out CE and KL of a document-masked student, measured on document-masked held-out text, are
    those of the student run on each held-out document alone."""
    student = LRCStudent(load_teacher("tiny-random:llama").model, 32)
    heldout = CacheHeldout(masked_cache)
    fields = CacheReader(masked_cache, split="heldout").read_shard(0)
    ids, position_ids = fields["input_ids"], fields["position_ids"].long()
    assert (position_ids == 0).sum(1).min() >= 2  # several documents in every held-out row
    with torch.no_grad():
        masked = evaluate_heldout(student_head_fn(student), heldout, 3, document_mask=True)
        plain = evaluate_heldout(student_head_fn(student), heldout, 3)
        logits = _by_document(student, ids, position_ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    ce = losses.cross_entropy_next(logits, ids.long(), valid)
    kl = losses.kl_topk(logits, fields["topk_ids"], fields["topk_logprobs"], valid, 1.0)
    assert masked["ce"] == pytest.approx(float(ce), abs=1e-5) and masked["kl"] == pytest.approx(float(kl), abs=1e-5)
    assert abs(plain["ce"] - masked["ce"]) > 1e-3


def test_pca_head_scale_is_fitted_on_the_masked_logits(masked_cache):
    """The PCA start's head-scale fit of a document-masked student scores the logits it trains with: each
    packed document alone."""
    student = LRCStudent(load_teacher("tiny-random:llama").model, 32)
    fields = CacheReader(masked_cache).read_shard(0)
    ids, position_ids = fields["input_ids"][:4], fields["position_ids"][:4].long()
    assert (position_ids == 0).sum(1).min() >= 2
    with torch.no_grad():
        alone, packed = _by_document(student, ids, position_ids), student(ids.long()).logits_BTV
    assert (alone - packed).abs().max() > 1e-3
    for document_mask, expected in ((True, alone), (False, packed)):
        scored = []
        calibrate_head_scale(student, [Batch(ids, position_ids=position_ids)], lambda logits, batch: (
            scored.append(logits.detach().clone()) or logits.float().pow(2).mean()), document_mask=document_mask)
        torch.testing.assert_close(scored[0], 0.25 * expected, rtol=1e-5, atol=1e-5)  # the grid's first c is 1/4
        with torch.no_grad():
            student.final_norm.fill_(1.0)


def test_training_follows_the_cache_and_its_export_is_evaluated_masked(masked_cache, tmp_path):
    summary = train_from_cache(_job(), masked_cache, tmp_path / "run", progress=False)
    assert summary["document_mask"] is True
    # The exported student, evaluated by `transformers` with position ids (its packed-sequence masking),
    # measures what the LRC student measured with its own document mask at the last step.
    export = evaluate_export_from_cache(tmp_path / "run" / "student", masked_cache, device="cpu")
    assert export["document_mask"] is True
    assert export["student_ce"] == pytest.approx(summary["heldout_ce"], abs=1e-4)
    assert export["kl"] == pytest.approx(summary["heldout_kl"], abs=1e-4)
    # On the corpus, against the teacher's forward: masked as the student was trained (its lrc_config.json).
    corpus = read_manifest(masked_cache).config.corpus
    teacher = load_teacher("tiny-random:llama")
    masked = evaluate_export(tmp_path / "run" / "student", teacher, corpus, 12, 48, 4)
    plain = evaluate_export(tmp_path / "run" / "student", teacher, corpus, 12, 48, 4, document_mask=False)
    assert masked["document_mask"] is True and plain["document_mask"] is False
    assert masked["student_ce"] == pytest.approx(summary["heldout_ce"], abs=1e-4)
    assert abs(masked["teacher_ce"] - plain["teacher_ce"]) > 1e-3


def test_training_refuses_a_document_mask_the_cache_disagrees_with(masked_cache, tmp_path):
    with pytest.raises(ConfigError, match=r"train.document_mask=false, but the teacher of the cache .* attended "
                                          r"each packed document alone.*allow_document_mask_mismatch=true"):
        train_from_cache(_job(document_mask=False), masked_cache, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    summary = train_from_cache(_job(document_mask=False, allow_document_mask_mismatch=True, steps=1), masked_cache,
                               tmp_path / "run", progress=False)  # fmt: skip
    assert summary["document_mask"] is False
