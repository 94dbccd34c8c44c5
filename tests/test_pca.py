"""PCA initialisation: the accumulator, the folding (a rotation reproduces the teacher), the cache pass."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrc_offline import losses
from lrc_offline.batch import Batch
from lrc_offline.cache import verify_cache
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, OptimConfig, StudentConfig, TrainConfig, TrainJobConfig
from lrc_offline.student.export import export_student
from lrc_offline.student.init import SecondMoment, calibrate_head_scale, init_pca, pca_basis
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.pca import cache_second_moment, second_moment_path
from lrc_offline.training.trainer import train_from_cache


def test_streaming_second_moment_matches_direct_eigendecomposition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen) @ torch.randn(12, 12, generator=gen)
    x[::7] *= 1000.0  # massive-activation rows: RMS normalisation stops them owning the basis
    moment = SecondMoment(12)
    for chunk in x.split(37):
        moment.update(chunk)
    normed = (x / x.pow(2).mean(-1, keepdim=True).sqrt()).double()
    direct = normed.t() @ normed / len(x)
    torch.testing.assert_close(moment.matrix_DD / moment.count, direct)
    basis = pca_basis(moment, 5)
    values, vectors = torch.linalg.eigh(direct)
    top = vectors[:, values.argsort(descending=True)[:5]].float()
    torch.testing.assert_close(basis.abs(), top.abs(), rtol=1e-4, atol=1e-5)  # equal up to sign
    assert torch.allclose(basis.t() @ basis, torch.eye(5), atol=1e-5)
    assert torch.equal(pca_basis(SecondMoment.from_state_dict(moment.state_dict()), 5), basis)


def _ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def test_any_rotation_with_folding_reproduces_the_teacher(teacher):
    d = teacher.config.hidden_size
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2)))
    student = LRCStudent(teacher, d, untie_head=True)
    init_pca(student, q)
    torch.testing.assert_close(student(_ids()).logits_BTV, teacher(input_ids=_ids()).logits, rtol=1e-4, atol=1e-4)


def test_pca_student_exports_untied_head_over_a_tied_teacher(tmp_path, tokenizer):
    from lrc_offline.teacher.tiny import tiny_teacher

    teacher = tiny_teacher("llama")
    assert teacher.config.tie_word_embeddings
    student = LRCStudent(teacher, 24, untie_head=True)
    init_pca(student, torch.linalg.qr(torch.randn(64, 24))[0])
    out = export_student(student, tmp_path / "s", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not model.config.tie_word_embeddings and model.lm_head.weight.shape == (teacher.config.vocab_size, 24)
    torch.testing.assert_close(model(input_ids=_ids()).logits, student(_ids()).logits_BTV, rtol=1e-5, atol=1e-5)
    tied = LRCStudent(teacher, 24)
    init_pca(tied, torch.linalg.qr(torch.randn(64, 24))[0])  # tied: rotated basis, fitted final norm (test_tied_head.py)
    assert tied.proj_lm_head is None and torch.isfinite(tied(_ids()).logits_BTV).all()


@pytest.fixture(scope="module")
def residual_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("pca") / "cache"
    # every layer at every stored position (not the default layer subset): each stored row is a residual vector
    build_cache(CacheConfig(seq_len=32, max_sequences=16, sequences_per_shard=8, act_positions=8, topk=8,
                            act_dtype="float32", act_layer_fraction=1.0), out, progress=False)  # fmt: skip
    return out


def test_cache_pass_accumulates_every_cached_residual_vector_and_is_reused(residual_cache):
    from lrc_offline.cache import CacheReader

    moment = cache_second_moment(residual_cache)
    reader = CacheReader(residual_cache)
    shards = [reader.read_shard(i) for i in reader.complete_shards()]
    inputs = torch.cat([s["act_input"].reshape(-1, 64) for s in shards])
    after_attention = torch.cat([(s["act_input"] + s["act_attn"]).reshape(-1, 64) for s in shards])
    direct = SecondMoment(64)
    direct.update(torch.cat([inputs, after_attention]))
    assert moment.count == 16 * 2 * 8 * 2 == direct.count  # sequences x layers x positions x (h, h + a)
    torch.testing.assert_close(moment.matrix_DD, direct.matrix_DD)
    assert second_moment_path(residual_cache, False).is_file()
    again = cache_second_moment(residual_cache)
    assert torch.equal(again.matrix_DD, moment.matrix_DD)
    no_sink = cache_second_moment(residual_cache, exclude_sink=True)
    assert 0 < no_sink.count < moment.count and no_sink.count % 2 == 0  # both layers of each kept position
    assert verify_cache(residual_cache).ok  # the stored basis does not disturb the cache


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_training_with_the_pca_start_writes_only_the_caches_derived_files(tmp_path, capsys):
    from lrc_offline.cli.cache import main as cache_main

    cache = tmp_path / "cache"
    build_cache(CacheConfig(seq_len=32, max_sequences=8, sequences_per_shard=4, act_positions=8, topk=8),
                cache, progress=False)  # fmt: skip
    before = _files(cache)
    cfg = TrainJobConfig(student=StudentConfig(hidden_size=32, init="pca"), train=TrainConfig(steps=1, batch_size=4))
    train_from_cache(cfg, cache, tmp_path / "run", progress=False)
    after = _files(cache)
    added = sorted(set(after) - set(before))
    assert len(added) == 1 and added[0].startswith("derived/pca/second_moment"), added
    assert {k: after[k] for k in before} == before  # the stage-1 artifact is untouched
    assert verify_cache(cache).ok
    assert cache_main(["verify", str(cache)]) == 0
    assert cache_main(["clean", str(cache)]) == 0  # plain clean keeps derived files
    assert _files(cache) == after
    assert cache_main(["clean", "--derived", str(cache)]) == 0
    assert "removed derived files pca" in capsys.readouterr().out
    assert _files(cache) == before
    assert verify_cache(cache).ok


def test_a_basis_stored_at_the_root_by_earlier_versions_is_still_read(residual_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(residual_cache, cache)
    moment = cache_second_moment(cache)
    legacy = cache / "pca" / "second_moment.safetensors"
    legacy.parent.mkdir()
    second_moment_path(cache, False).rename(legacy)  # where earlier versions kept it
    again = cache_second_moment(cache)
    assert torch.equal(again.matrix_DD, moment.matrix_DD)
    assert not second_moment_path(cache, False).exists()  # read from there, not recomputed


def test_pca_init_starts_closer_to_the_teacher_than_random(residual_cache, tmp_path):
    first = {}
    for init, calibrate in (("random", 0), ("pca", 0), ("pca-calibrated", 16)):
        cfg = TrainJobConfig(student=StudentConfig(hidden_size=32, init=init.split("-")[0], head="untied",
                                                   pca_calibrate_sequences=calibrate),
                             train=TrainConfig(steps=1, batch_size=8, log_every=1))  # fmt: skip
        train_from_cache(cfg, residual_cache, tmp_path / init, progress=False)
        first[init] = read_metrics(tmp_path / init / "metrics.jsonl")[0]
    assert first["pca"]["kd"] < 0.5 * first["random"]["kd"], first
    info = json.loads((tmp_path / "pca" / "student" / "lrc_config.json").read_text())
    assert info["init"]["kind"] == "pca" and info["init"]["vectors"] == 512 and info["init"]["head_scale"] == 1.0
    # The head scale is fitted to KD + CE (the tiny random teacher is near uniform, so a softer head wins
    # on CE): the first step's logit loss can only go down.
    calibrated = json.loads((tmp_path / "pca-calibrated" / "student" / "lrc_config.json").read_text())
    assert calibrated["init"]["head_scale_sequences"] == 16 and calibrated["init"]["head_scale"] != 1.0
    logit_loss = {k: first[k]["kd"] + first[k]["ce"] for k in ("pca", "pca-calibrated")}
    assert logit_loss["pca-calibrated"] < logit_loss["pca"], logit_loss


def _train_ce(student, ids, scale=1.0):
    with torch.no_grad():
        logits = student(ids).logits_BTV * scale
    return losses.cross_entropy_next(logits, ids, torch.ones_like(ids, dtype=torch.bool)).item()


def _ce_score(logits, batch):
    ids = batch.input_ids
    return losses.cross_entropy_next(logits, ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize("overconfidence", [1.0, 3.0])
def test_head_scale_calibration_finds_the_loss_minimising_temperature(teacher, overconfidence):
    d = teacher.config.hidden_size
    student = LRCStudent(teacher, 24, untie_head=True)
    init_pca(student, torch.linalg.qr(torch.randn(d, 24, generator=torch.Generator().manual_seed(3)))[0])
    with torch.no_grad():
        student.final_norm.mul_(overconfidence)  # logits x 3: a far too sharp head
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(4))
    grid = torch.linspace(0.25, 2.0, 1751).tolist()  # naive reference: brute force over c, 0.001 apart
    reference = min(grid, key=lambda c: _train_ce(student, ids, c))
    before = _train_ce(student, ids)
    batches = [Batch(ids[:4]), Batch(ids[4:])]  # unequal batches: weighted by tokens
    scale = calibrate_head_scale(student, batches, _ce_score)
    assert abs(scale - reference) < 0.01 * reference, (scale, reference)
    assert _train_ce(student, ids) <= before + 1e-6
    if overconfidence == 3.0:
        assert scale < 0.6


def test_head_scale_is_left_alone_for_a_rotation(residual_cache, tmp_path):
    cfg = TrainJobConfig(student=StudentConfig(hidden_size=64, init="pca", head="untied"),
                         train=TrainConfig(steps=1, batch_size=8, log_every=1))  # fmt: skip
    train_from_cache(cfg, residual_cache, tmp_path / "full", progress=False)
    info = json.loads((tmp_path / "full" / "student" / "lrc_config.json").read_text())
    assert info["init"]["head_scale"] == 1.0


def test_pca_needs_residual_activations(tmp_path):
    out = tmp_path / "c"
    build_cache(CacheConfig(seq_len=16, max_sequences=8, sequences_per_shard=8, activation_mode="none", topk=4),
                out, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="activation_mode=residual"):
        cache_second_moment(out)


def test_pca_pass_can_be_capped(residual_cache):
    capped = cache_second_moment(residual_cache, max_sequences=3)
    assert capped.count == 3 * 2 * 8 * 2  # sequences x layers x positions x (h, h + a)
    assert second_moment_path(residual_cache, False, 3).is_file()


def test_auto_init_is_pca_with_residual_activations_and_random_without(residual_cache, tmp_path):
    logit_only = tmp_path / "logit-only"
    build_cache(CacheConfig(seq_len=16, max_sequences=8, sequences_per_shard=8, activation_mode="none", topk=4),
                logit_only, progress=False)  # fmt: skip
    job = TrainJobConfig(student=StudentConfig(hidden_size=32), train=TrainConfig(steps=1, batch_size=4))
    assert (job.student.init, job.student.head, job.optim.lr) == ("auto", "auto", None)
    for cache, expected in ((residual_cache, ("pca", "auto", 5e-5)), (logit_only, ("random", "auto", 1e-3))):
        train_from_cache(job, cache, tmp_path / expected[0], progress=False)
        saved = json.loads((tmp_path / expected[0] / "config.json").read_text())  # the resolved config is saved
        assert (saved["student"]["init"], saved["student"]["head"], saved["optim"]["lr"]) == expected
        info = json.loads((tmp_path / expected[0] / "student" / "lrc_config.json").read_text())
        assert info["init"]["kind"] == expected[0]
    explicit = job.resolved(residual_available=True)
    assert explicit.resolved(residual_available=False) == explicit  # resolving twice changes nothing
    kept = TrainJobConfig(student=StudentConfig(init="random"), optim=OptimConfig(lr=5e-4)).resolved(True)
    assert (kept.student.init, kept.student.head, kept.optim.lr) == ("random", "auto", 5e-4)


def test_a_resumed_pca_run_keeps_its_init_without_redoing_it(residual_cache, tmp_path, monkeypatch):
    import lrc_offline.training.trainer as trainer

    cfg = TrainJobConfig(student=StudentConfig(hidden_size=32),
                         train=TrainConfig(steps=2, batch_size=8, log_every=1, checkpoint_every=1))  # fmt: skip
    train_from_cache(cfg, residual_cache, tmp_path, progress=False, max_steps_this_run=1)
    first = json.loads((tmp_path / "checkpoints" / "step-000001" / "state.json").read_text())["extra"]["init"]
    assert first["kind"] == "pca" and "head_scale" in first

    def refuse(*args, **kwargs):
        raise AssertionError("the PCA init ran again on resume")

    monkeypatch.setattr(trainer, "cache_head_scale_batches", refuse)
    monkeypatch.setattr(trainer, "cache_second_moment", refuse)
    train_from_cache(cfg, residual_cache, tmp_path, progress=False)
    assert json.loads((tmp_path / "student" / "lrc_config.json").read_text())["init"] == first
