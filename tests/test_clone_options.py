"""Clone-loss options (huber, position and sink weights, fixed normalisers, alpha schedule), the cache's
activation statistics and the activation budget, each against a naive reference."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lrc_offline.batch import Batch
from lrc_offline.cache import CacheReader
from lrc_offline.cache.act_stats import act_layer_mask, act_present, activation_stats, teacher_ms
from lrc_offline.capture.build import build_cache
from lrc_offline.config import (
    CLONE_TERMS,
    CacheConfig,
    ConfigError,
    LossConfig,
    OptimConfig,
    TrainConfig,
    TrainJobConfig,
    apply_overrides,
)
from lrc_offline.losses import clone_loss, huber
from lrc_offline.online import train_online
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.hooks import capture_teacher
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.objective import clone_weights, lrc_loss, sink_positions
from lrc_offline.training.reader import stack_samples
from lrc_offline.training.trainer import train_from_cache

F64 = torch.float64
L, B, P = 2, 3, 4
WIDTHS = {"q": 5, "o": 3, "down": 4}


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    student, target = {}, {}
    for term, width in WIDTHS.items():
        scale = 1.0 + 10.0 * torch.rand((), generator=g)
        target[term] = (torch.randn(L, B, P, width, generator=g, dtype=F64) * scale)
        # A few large errors, so huber's linear branch is exercised.
        noise = torch.randn(L, B, P, width, generator=g, dtype=F64) * (1 + 20 * (torch.rand(L, B, P, width, generator=g) > 0.8))
        student[term] = (target[term] + noise).requires_grad_(True)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True], [False, False, False, False]])
    weights = torch.tensor([[3.0, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
    return student, target, mask, weights


def _naive(student, target, mask, pos_w, term_w, normalize, reduce, loss_fn, delta, target_ms, eps=1e-6):
    """Loops over every element; huber written out by cases."""
    total, weight_sum = 0.0, 0.0
    for term, s in student.items():
        t = target[term]
        w_term = term_w.get(term, 1.0)
        weight_sum += w_term
        for layer in range(L):
            num, den, sq_t = 0.0, 0.0, 0.0
            for b in range(B):
                for p in range(P):
                    w = float(mask[b, p]) * float(pos_w[b, p])
                    for j in range(s.shape[-1]):
                        den += w
                        sq_t += w * t[layer, b, p, j].item() ** 2
            ms = None
            if normalize:
                ms = target_ms[term][layer].item() if target_ms is not None else sq_t / den
                ms = max(ms, eps)
            for b in range(B):
                for p in range(P):
                    w = float(mask[b, p]) * float(pos_w[b, p])
                    for j in range(s.shape[-1]):
                        r = s[layer, b, p, j] - t[layer, b, p, j]
                        if loss_fn == "mse":
                            e = r**2 / ms if normalize else r**2
                        else:
                            x = r / ms**0.5 if normalize else r
                            e = x**2 if abs(x.item()) <= delta else 2 * delta * x.abs() - delta**2
                        num = num + w * e
            total = total + w_term * num / den
    return total / (L * weight_sum) if reduce == "mean" else total


def test_huber_is_square_then_linear():
    x = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], dtype=F64)
    assert torch.equal(huber(x, 1.0), torch.tensor([9.0, 1.0, 0.25, 0.0, 0.25, 1.0, 9.0], dtype=F64))
    assert torch.equal(huber(x, 10.0), x.square())
    slope = torch.autograd.functional.jacobian(lambda v: huber(v, 1.0).sum(), torch.tensor([3.0, -7.0, 0.25]))
    assert torch.equal(slope, torch.tensor([2.0, -2.0, 0.5]))  # bounded by 2 delta beyond delta


@pytest.mark.parametrize("loss_fn", ["mse", "huber"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fixed_ms", [False, True])
def test_clone_loss_options_match_naive(loss_fn, normalize, fixed_ms):
    if fixed_ms and not normalize:
        pytest.skip("fixed normalisers apply only with normalize")
    student, target, mask, pos_w = _inputs(3)
    term_w = {"q": 2.0, "down": 0.5}
    ms = {t: torch.tensor([4.0, 0.25], dtype=F64) for t in WIDTHS} if fixed_ms else None
    delta = 1.5
    for reduce in ("mean", "sum"):
        total, per_term = clone_loss(student, target, mask, term_w, normalize=normalize, reduce=reduce,
                                     position_weights_BP=pos_w, target_ms=ms, loss_fn=loss_fn, huber_delta=delta)  # fmt: skip
        ref = _naive(student, target, mask, pos_w, term_w, normalize, reduce, loss_fn, delta, ms)
        torch.testing.assert_close(total, ref, rtol=1e-10, atol=1e-12)
        got = torch.autograd.grad(total, list(student.values()))
        want = torch.autograd.grad(ref, list(student.values()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert set(per_term) == set(WIDTHS)


def test_zero_position_weight_equals_masking_it():
    student, target, mask, _ = _inputs(4)
    weights = torch.ones(B, P, dtype=F64)
    weights[:, 0] = 0.0  # e.g. sink_weight=0 with the sink at position 0
    by_weight, _ = clone_loss(student, target, mask, position_weights_BP=weights)
    by_mask, _ = clone_loss(student, target, mask & (weights > 0))
    torch.testing.assert_close(by_weight, by_mask, rtol=1e-12, atol=0)
    all_zero, per_term = clone_loss(student, target, mask, position_weights_BP=torch.zeros(B, P, dtype=F64))
    assert all_zero.item() == 0.0 and all(v.item() == 0.0 for v in per_term.values())


def test_alpha_schedules():
    def at(schedule, step, **kw):
        return LossConfig(alpha=1.0, alpha_schedule=schedule, alpha_end=0.2, **kw).alpha_at(step, 100)

    assert [at("constant", s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [at("linear", s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.6, 0.2])
    assert [at("cosine", s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.6, 0.2])
    assert at("cosine", 25) == pytest.approx(0.2 + 0.8 * (1 + 2**-0.5) / 2)
    assert [at("step", s, alpha_steps=30) for s in (0, 29, 30, 99)] == [1.0, 1.0, 0.2, 0.2]
    assert at("linear", 10, alpha_steps=20) == pytest.approx(0.6)


def test_loss_config_choices():
    assert LossConfig(clone_normalize=True).clone_normalize == "batch"
    assert LossConfig(clone_normalize=False).clone_normalize == "none"
    cfg = apply_overrides(TrainJobConfig(), ["loss.clone_normalize=cache", "loss.clone_fn=huber"])
    assert (cfg.loss.clone_normalize, cfg.loss.clone_fn) == ("cache", "huber")
    for bad in (dict(clone_normalize="per-token"), dict(clone_fn="l1"), dict(huber_delta=0.0),
                dict(sink_weight=-1.0), dict(alpha_schedule="exp"), dict(alpha_steps=0)):  # fmt: skip
        with pytest.raises(ConfigError):
            LossConfig(**bad)
    with pytest.raises(ConfigError, match="act_fraction"):
        CacheConfig(act_fraction=0.0)


# ---- the cache: statistics, sinks, budget --------------------------------------------------------------

SEQ_LEN, NUM_SEQ, PER_SHARD = 32, 32, 8


def _cache_cfg(**kw) -> CacheConfig:
    # "full": lossless activations at every layer (not the compact defaults); variants name what they change
    base = dict(teacher="tiny-random:llama", corpus="tiny-text", seq_len=SEQ_LEN, max_sequences=NUM_SEQ,
                sequences_per_shard=PER_SHARD, act_positions=6, act_dtype="float32",
                act_layer_fraction=1.0)  # fmt: skip
    return CacheConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    base = tmp_path_factory.mktemp("clone_caches")
    out = {}
    variants = {"full": {}, "half": {"act_fraction": 0.5}, "targets": {"activation_mode": "targets"},
                "layers": {"act_layer_fraction": 0.5}}  # fmt: skip
    for name, kw in variants.items():
        build_cache(_cache_cfg(**kw), base / name, progress=False)
        out[name] = base / name
    return out


def _all_sequences(root):
    """The cache's reader and every sequence's fields, stacked."""
    reader = CacheReader(root)
    return reader, stack_samples(list(reader.iter_sequences()))


def _first(fields, num: int = 4) -> Batch:
    """The batch of the first `num` sequences of stacked `fields`."""
    return Batch.from_fields({k: v[:num] for k, v in fields.items()})


def test_activation_stats_match_the_hooked_teacher(caches):
    teacher = load_teacher("tiny-random:llama")
    for name in ("full", "targets"):
        reader, data = _all_sequences(caches[name])
        stats = activation_stats([reader.shard_record(i) for i in reader.complete_shards()])
        captured = capture_teacher(teacher.model, data["input_ids"].long(), positions_BP=data["act_positions"].long(),
                                   terms=CLONE_TERMS, want_logits=False)  # fmt: skip
        sink = data["position_ids"].gather(1, data["act_positions"].long()) == 0
        assert stats["sequences"] == NUM_SEQ
        assert stats["sink_positions"] == int(sink.sum()) >= NUM_SEQ  # position 0 of every sequence, at least
        assert stats["sink_positions"] + stats["other_positions"] == NUM_SEQ * 6
        for term in CLONE_TERMS:
            ms_LBP = captured.acts[term].double().square().mean(-1)
            want_sink = (ms_LBP * sink).sum((1, 2)) / sink.sum()
            want_other = (ms_LBP * ~sink).sum((1, 2)) / (~sink).sum()
            got = teacher_ms(stats)[term].double()  # [L, 2]: sink rows, other rows
            torch.testing.assert_close(got, torch.stack([want_sink, want_other], dim=1), rtol=1e-5, atol=0)


def test_sink_positions_are_sampled_and_found(caches):
    _, data = _all_sequences(caches["full"])
    sink = sink_positions(Batch.from_fields(data))
    starts = data["position_ids"] == 0
    assert bool(sink[:, 0].all())  # position 0 in every sequence
    for b in range(NUM_SEQ):  # every document start is stored, up to P of them
        stored = set(data["act_positions"][b].tolist())
        want = set(torch.nonzero(starts[b]).flatten().tolist()[:6])
        assert want <= stored
        assert set(data["act_positions"][b][sink[b]].tolist()) == want
    assert int(starts.sum()) > NUM_SEQ  # the tiny corpus packs several documents per sequence


def test_sink_weight_zero_leaves_sinks_out(caches):
    teacher = load_teacher("tiny-random:llama")
    _, data = _all_sequences(caches["full"])
    batch = _first(data)
    cfg_out = LossConfig(alpha=1.0, kd_weight=0.0, beta=0.0, sink_weight=0.0)
    mask, weights = clone_weights(batch, cfg_out)
    assert mask is None and torch.equal(weights == 0, sink_positions(batch))
    student = LRCStudent(teacher.model, 32, seed=1)
    excluded, _ = lrc_loss(student, batch, cfg_out)
    no_sinks_LBP = ~sink_positions(batch).expand(2, -1, -1)  # the sinks masked out in both layers
    sinks_masked = dataclasses.replace(batch, clone=dataclasses.replace(batch.clone, keep_LBP=no_sinks_LBP))
    masked, _ = lrc_loss(student, sinks_masked, LossConfig(alpha=1.0, kd_weight=0.0, beta=0.0))
    torch.testing.assert_close(excluded, masked, rtol=1e-6, atol=0)
    heavy, _ = lrc_loss(student, batch, LossConfig(alpha=1.0, kd_weight=0.0, beta=0.0, sink_weight=5.0))
    assert not torch.isclose(heavy, masked)


def test_cache_normaliser_in_the_objective(caches):
    """clone_normalize=cache divides q/k/v/gate/up by the recorded mean squares of each row's class (sink
    or other) and o/down by them times the projection's mean gain."""
    teacher = load_teacher("tiny-random:llama")
    reader, data = _all_sequences(caches["full"])
    stats = activation_stats([reader.shard_record(i) for i in reader.complete_shards()])
    ms = teacher_ms(stats)
    batch = _first(data)
    student = LRCStudent(teacher.model, 32, seed=2)
    cfg = LossConfig(alpha=1.0, kd_weight=0.0, beta=0.0, clone_normalize="cache")
    total, parts = lrc_loss(student, batch, cfg, teacher_ms=ms)
    # The reference: clone_loss with the normalisers written out.
    layers = list(range(student.num_layers))
    acts = batch.clone.acts
    per_layer = [student.teacher_targets_from_residual(i, acts["input"][:, i], acts["attn"][:, i]) for i in layers]
    targets = {m: torch.stack([t[m] for t in per_layer]) for m in CLONE_TERMS}
    for m in ("o", "down"):  # compared in student space: P_m^T t
        proj_LDS = torch.stack([student.layers[i].proj[m] for i in layers])
        targets[m] = torch.einsum("lbpd,lds->lbps", targets[m], proj_LDS)
    out = student(batch.input_ids.long(), clone_positions_BP=batch.clone.positions_BP, clone_layers=layers)
    fixed = {}
    for term in CLONE_TERMS:
        fixed[term] = ms[term].clone()
        if term in ("o", "down"):
            gain = torch.stack([student.layers[i].proj[term].detach().square().sum() for i in layers]) / 32
            fixed[term] = fixed[term] * gain[:, None]
    ref, _ = clone_loss({m: out.acts[m] for m in CLONE_TERMS}, targets, normalize=True, target_ms=fixed,
                        sink_BP=sink_positions(batch))  # fmt: skip
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="teacher_ms"):
        lrc_loss(student, batch, cfg)


def test_budgeted_cache_stores_activations_for_its_fraction(caches):
    cfg = _cache_cfg(act_fraction=0.5)
    reader, data = _all_sequences(caches["half"])
    _, full = _all_sequences(caches["full"])
    present = data["act_present"].flatten().bool()
    want = torch.tensor([act_present(cfg.seed, j, 0.5) for j in data["sequence_index"].tolist()])
    assert torch.equal(present, want) and 0 < int(present.sum()) < NUM_SEQ
    for name in ("act_input", "act_attn"):
        assert torch.equal(data[name][present], full[name][present])  # same positions, same values
        assert bool((data[name][~present] == 0).all())
    stats = activation_stats([reader.shard_record(i) for i in reader.complete_shards()])
    assert stats["sequences"] == int(present.sum())

    def act_bytes(r):
        return sum(r.shard_record(i)["field_bytes"][f] for i in r.complete_shards() for f in ("act_input", "act_attn"))

    # Absent sequences' zeros compress to almost nothing: the activation bytes follow the fraction.
    assert act_bytes(reader) < (int(present.sum()) / NUM_SEQ + 0.1) * act_bytes(CacheReader(caches["full"]))


def test_budgeted_cache_trains_and_reports_coverage(caches, tmp_path):
    reader, data = _all_sequences(caches["half"])
    fraction = float(data["act_present"].float().mean())
    job = TrainJobConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1),
                         loss=LossConfig(alpha=1.0, clone_normalize="cache", sink_weight=0.5),
                         train=TrainConfig(steps=8, batch_size=4, log_every=1))  # fmt: skip
    summary = train_from_cache(job, caches["half"], tmp_path / "run", progress=False)
    # 8 steps x 4 = one epoch of the 32 sequences: coverage is exactly the cache's fraction.
    assert summary["clone_coverage"] == pytest.approx(fraction)
    assert summary["cache_act_fraction"] == pytest.approx(fraction)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert any(r["clone"] > 0 for r in records)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["clone_coverage"] == pytest.approx(fraction)


def test_alpha_schedule_in_training_and_cache_normaliser_refused_online(caches, tmp_path):
    job = TrainJobConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1),
                         loss=LossConfig(alpha=1.0, alpha_schedule="step", alpha_steps=3),
                         train=TrainConfig(steps=5, batch_size=4, log_every=1))  # fmt: skip
    train_from_cache(job, caches["full"], tmp_path / "run", progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["alpha"] for r in records] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert all("clone" in r for r in records[:3]) and not any("clone" in r for r in records[3:])
    online = apply_overrides(job, ["teacher=tiny-random:llama", "loss.clone_normalize=cache"])
    with pytest.raises(ConfigError, match="online training"):
        train_online(online, tmp_path / "online", progress=False)


def test_pca_basis_of_a_budgeted_cache_skips_absent_sequences(caches):
    from lrc_offline.training.pca import _accumulate

    reader, data = _all_sequences(caches["half"])
    present = data["act_present"].reshape(-1).bool()
    moment = _accumulate(reader, exclude_sink=False, max_sequences=None)
    assert moment.count == int(present.sum()) * 2 * 6 * 2  # present sequences x layers x positions x (h, h + a)
    assert bool(torch.isfinite(moment.matrix_DD).all())


def test_layer_subset_cache_stores_each_positions_layers(caches):
    cfg = _cache_cfg(act_layer_fraction=0.5)
    reader, data = _all_sequences(caches["layers"])
    _, full = _all_sequences(caches["full"])
    mask_BLP = data["act_layer_mask"].bool()
    start_BP = data["act_positions"] == 0
    want = torch.stack([act_layer_mask(cfg.seed, j, 2, 6, 0.5, start) for j, start in
                        zip(data["sequence_index"].tolist(), start_BP)])  # fmt: skip
    assert torch.equal(mask_BLP, want)
    # 1 of the 2 layers at a position, both at the sequence's start; every layer in every sequence.
    assert bool(start_BP[:, 0].all()) and int(start_BP.sum()) == NUM_SEQ
    assert torch.equal(mask_BLP.sum(1), torch.where(start_BP, 2, 1)) and bool(mask_BLP.any(2).all())
    assert torch.equal(data["act_positions"], full["act_positions"])
    for name in ("act_input", "act_attn"):
        assert torch.equal(data[name][mask_BLP], full[name][mask_BLP])  # same positions, same values
        assert bool((data[name][~mask_BLP] == 0).all())
    # The statistics are the teacher's at every sampled (layer, position), as in the full cache.
    stats = activation_stats([reader.shard_record(i) for i in reader.complete_shards()])
    full_reader = CacheReader(caches["full"])
    assert stats == activation_stats([full_reader.shard_record(i) for i in full_reader.complete_shards()])

    def act_bytes(r):
        return sum(r.shard_record(i)["field_bytes"][f] for i in r.complete_shards() for f in ("act_input", "act_attn"))

    # The zeros compress to almost nothing: the activation bytes follow the rows kept.
    kept = float(mask_BLP.float().mean())
    assert kept < 0.75 and act_bytes(reader) < (kept + 0.1) * act_bytes(full_reader)
    from lrc_offline.cache import inspect_cache

    summary = inspect_cache(caches["layers"])["activations"]
    assert (summary["layers_per_position"], summary["stored_layers"]) == (1, 2)
    assert inspect_cache(caches["full"])["activations"]["layers_per_position"] == 2


def test_layer_subset_batch_loss_is_the_full_batch_masked_per_layer(caches):
    """The objective on a layer-subset batch equals the objective on the full cache's batch of the same
    sequences with the same per-layer mask: the zeros stored outside the mask never count."""
    _, data = _all_sequences(caches["layers"])
    _, full = _all_sequences(caches["full"])
    teacher = load_teacher("tiny-random:llama")
    student = LRCStudent(teacher.model, 16, seed=0)
    cfg = LossConfig(alpha=1.0, kd_weight=0.0, beta=0.0)
    subset_batch = _first(data)
    masked_full = _first(full | {"act_layer_mask": data["act_layer_mask"]})
    got, got_parts = lrc_loss(student, subset_batch, cfg)
    want, want_parts = lrc_loss(student, masked_full, cfg)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_parts.keys() == want_parts.keys()
    unmasked, _ = lrc_loss(student, _first(full), cfg)
    assert not torch.allclose(got, unmasked)
    mask, _ = clone_weights(subset_batch, cfg)
    assert mask.shape == (2, 4, 6)


def test_layer_subset_cache_trains_and_its_pca_basis_reads_stored_rows_only(caches, tmp_path):
    from lrc_offline.training.pca import _accumulate

    job = TrainJobConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1), loss=LossConfig(alpha=1.0),
                         train=TrainConfig(steps=4, batch_size=4, log_every=1))  # fmt: skip
    train_from_cache(job, caches["layers"], tmp_path / "run", progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(r["clone"] > 0 for r in records)
    reader, data = _all_sequences(caches["layers"])
    moment = _accumulate(reader, exclude_sink=False, max_sequences=None)
    # (the start x 2 layers + the other 5 positions x 1 layer) x (h, h + a)
    assert moment.count == NUM_SEQ * (2 + 5) * 2
    nosink = _accumulate(reader, exclude_sink=True, max_sequences=None)
    sinks = data["position_ids"].gather(1, data["act_positions"].long()) == 0  # the starts and other document starts
    assert nosink.count == int(data["act_layer_mask"].bool().transpose(1, 2)[~sinks].sum()) * 2 < moment.count


def test_cache_built_before_a_new_config_key_is_still_resumed(tmp_path):
    """A cache whose manifest predates a config key (here act_fraction) is resumed by a build that asks
    for that key's default, keeping its complete shards; a non-default value is refused."""
    from lrc_offline.cache.manifest import Manifest
    from lrc_offline.cache.store import CacheMismatchError

    cfg = _cache_cfg(max_sequences=16)
    build_cache(cfg, tmp_path, progress=False)
    manifest_file = tmp_path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["config"]["act_fraction"]
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for record_file in (tmp_path / "shards").glob("*.done.json"):
        record = json.loads(record_file.read_text())
        record["manifest"] = Manifest.from_dict(manifest).digest()
        record_file.write_text(json.dumps(record))
    report = build_cache(cfg, tmp_path, progress=False)
    assert report.built == [] and report.skipped == [0, 1]
    with pytest.raises(CacheMismatchError, match="act_fraction"):
        build_cache(_cache_cfg(max_sequences=16, act_fraction=0.5), tmp_path, progress=False)


def test_default_normaliser_in_training_uses_the_cache_statistics(caches, tmp_path):
    """`loss.clone_normalize=auto` (the default) trains exactly as `cache` on a cache with statistics, and
    not as the batch normaliser."""

    def losses(mode: str | None) -> list[float]:
        loss = LossConfig(alpha=1.0) if mode is None else LossConfig(alpha=1.0, clone_normalize=mode)
        job = TrainJobConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1), loss=loss,
                             train=TrainConfig(steps=3, batch_size=4, log_every=1))  # fmt: skip
        train_from_cache(job, caches["layers"], tmp_path / str(mode), progress=False)
        return [r["loss"] for r in read_metrics(tmp_path / str(mode) / "metrics.jsonl") if "loss" in r]

    default = losses(None)
    assert LossConfig().clone_normalize == "auto"
    assert default == losses("cache")
    assert default != losses("batch")
