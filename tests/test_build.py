"""`lrc-cache build`: what lands in the cache is what the teacher produced; jobs are safe to rerun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lrc_offline.cache import CacheMismatchError, CacheReader, verify_cache
from lrc_offline.capture import build as build_mod
from lrc_offline.capture.build import build_cache, my_shards
from lrc_offline.data import CorpusError, load_documents, pack_documents
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.config import CLONE_TERMS, BuildRunConfig, CacheConfig
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.teacher.hooks import capture_teacher
from lrc_offline.teacher.load import TeacherLoadError, load_teacher

# Lossless fields at every layer (the old defaults but float32, not the compact codec): what lands in the
# cache is compared with the teacher's own tensors.
SMALL = dict(seq_len=24, max_sequences=12, sequences_per_shard=5, topk=8, num_draws=16, act_positions=6,
             logprob_dtype="float32", act_dtype="float32", act_layer_fraction=1.0,
             run=BuildRunConfig(batch_size=4))  # fmt: skip


@pytest.fixture(scope="module")
def llama():
    return load_teacher("tiny-random:llama")


def _all_sequences(cache: Path) -> dict[str, torch.Tensor]:
    reader = CacheReader(cache)
    shards = [reader.read_shard(i) for i in reader.complete_shards()]
    return {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


def _reference(teacher, cfg: CacheConfig, ids, positions, terms):
    return capture_teacher(teacher.model, ids.long(), positions_BP=positions, terms=terms, want_hidden=True)


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("logit_mode", ["topk", "sampled", "hidden"])
@pytest.mark.parametrize("act_mode", ["residual", "targets", "none"])
def test_cache_holds_what_the_teacher_produced(tmp_path, llama, fmt, logit_mode, act_mode):
    cfg = CacheConfig(format=fmt, logit_mode=logit_mode, activation_mode=act_mode, **SMALL)
    build_cache(cfg, tmp_path / "c", progress=False, teacher=llama)
    got = _all_sequences(tmp_path / "c")
    packed = pack_documents(load_documents("tiny-text"), llama.tokenizer, cfg.seq_len, cfg.max_sequences)
    assert torch.equal(got["input_ids"], packed.input_ids) and torch.equal(got["position_ids"], packed.position_ids)
    positions = got.get("act_positions")
    terms = {"residual": ("input", "attn"), "targets": CLONE_TERMS, "none": ()}[act_mode]
    ref = _reference(llama, cfg, packed.input_ids, positions, terms)
    if logit_mode == "topk":
        logprobs = torch.log_softmax(ref.logits_BTV, -1)
        torch.testing.assert_close(got["topk_logprobs"], logprobs.topk(cfg.topk, -1).values, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.gather(logprobs, -1, got["topk_ids"].long()), got["topk_logprobs"],
                                   rtol=0, atol=1e-5)  # fmt: skip
    elif logit_mode == "sampled":
        counts = got["sampled_counts"].long()
        assert torch.all(counts.sum(-1) == cfg.num_draws)
        ids = got["sampled_ids"]
        assert torch.all((ids >= 0) == (counts > 0)) and int(ids.max()) < llama.config.vocab_size
    else:
        # hidden mode: the teacher's head applied to the cached state recomputes its logits
        torch.testing.assert_close(got["hidden"], ref.hidden_BTD, rtol=1e-5, atol=1e-5)
        logits = got["hidden"] @ llama.model.lm_head.weight.t()
        torch.testing.assert_close(logits, ref.logits_BTV, rtol=1e-4, atol=1e-4)
    if act_mode == "none":
        assert "act_positions" not in got
        return
    assert positions.shape == (cfg.max_sequences, cfg.act_positions) and torch.all(positions[:, 0] == 0)
    for term in terms:
        name = f"act_{term}"
        torch.testing.assert_close(got[name], ref.acts[term].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_targets_recomputed_from_cached_residuals_equal_the_teachers(tmp_path, llama):
    common = dict(SMALL, activation_mode="residual", logit_mode="topk")
    build_cache(CacheConfig(**common), tmp_path / "res", progress=False, teacher=llama)
    build_cache(CacheConfig(**dict(common, activation_mode="targets")), tmp_path / "tgt", progress=False,
                teacher=llama)  # fmt: skip
    residual, targets = _all_sequences(tmp_path / "res"), _all_sequences(tmp_path / "tgt")
    student = LRCStudent(llama.model, 16)
    for layer in range(student.num_layers):
        rec = student.teacher_targets_from_residual(layer, residual["act_input"][:, layer], residual["act_attn"][:, layer])
        for term in CLONE_TERMS:
            torch.testing.assert_close(rec[term], targets[f"act_{term}"][:, layer], rtol=1e-5, atol=1e-5)


def test_a_build_with_no_codec_keys_writes_the_compact_cache_and_records_its_positions(tmp_path, llama):
    import json

    cfg = CacheConfig(seq_len=128, max_sequences=4, sequences_per_shard=4, run=BuildRunConfig(batch_size=4))
    build_cache(cfg, tmp_path / "c", progress=False, teacher=llama)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    config = manifest["config"]
    assert (config["logprob_dtype"], config["act_dtype"], config["act_layer_fraction"]) == ("float16", "int4g", 0.25)
    assert config["act_positions"] == 16  # auto, resolved: max(16, 128 // 64)
    dtypes = {f["name"]: (f["dtype"], f["shape"]) for f in manifest["fields"]}
    assert dtypes["topk_logprobs"][0] == "float16" and dtypes["act_input"] == ("int4g", [2, 16, 64])
    assert dtypes["act_layer_mask"] == ("uint8", [2, 16])
    got = _all_sequences(tmp_path / "c")
    # each position holds one of the 2 layers (ceil(0.25 * 2)), the sequence start both
    assert got["act_layer_mask"][:, :, 0].all() and (got["act_layer_mask"][:, :, 1:].sum(1) == 1).all()
    assert verify_cache(tmp_path / "c").ok
    # the same config asked again (auto unresolved) agrees with the manifest it wrote: the build resumes
    assert build_cache(cfg, tmp_path / "c", progress=False, teacher=llama).skipped == [0]


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted((cache / "shards").rglob("*"))
            if p.is_file() and not p.name.endswith(".done.json")}  # fmt: skip


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_rebuild_is_byte_identical(tmp_path, llama, fmt):
    cfg = CacheConfig(format=fmt, logit_mode="sampled", act_dtype="bfloat16", **{k: v for k, v in SMALL.items()
                                                                              if k != "act_dtype"})  # fmt: skip
    build_cache(cfg, tmp_path / "a", progress=False, teacher=llama)
    build_cache(cfg, tmp_path / "b", progress=False, teacher=llama)
    a, b = _shard_bytes(tmp_path / "a"), _shard_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and a == b


def test_killed_build_resumes_to_a_complete_verified_cache(tmp_path, llama, monkeypatch):
    cfg = CacheConfig(**SMALL)
    real = build_mod.capture_batch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "capture_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, tmp_path / "c", progress=False, teacher=llama)
    report = verify_cache(tmp_path / "c")
    assert report.complete == [0] and not report.ok
    monkeypatch.setattr(build_mod, "capture_batch", real)
    rerun = build_cache(cfg, tmp_path / "c", progress=False, teacher=llama)
    assert rerun.skipped == [0] and rerun.built == [1, 2]
    assert verify_cache(tmp_path / "c").ok
    got = _all_sequences(tmp_path / "c")
    packed = pack_documents(load_documents("tiny-text"), llama.tokenizer, cfg.seq_len, cfg.max_sequences)
    assert torch.equal(got["input_ids"], packed.input_ids)  # none missing, none repeated, in order
    assert not [p for p in (tmp_path / "c" / "shards").iterdir() if p.name.startswith(".tmp")]


def test_parallel_workers_split_the_shards(tmp_path, llama):
    assert my_shards(7, 1, 3) == [1, 4] and my_shards(7, 3) == [3] and my_shards(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="worker-index"):
        my_shards(3, 5)
    cfg = CacheConfig(**SMALL)
    first = build_cache(cfg, tmp_path / "c", 0, 2, progress=False, teacher=llama)
    second = build_cache(cfg, tmp_path / "c", 1, 2, progress=False, teacher=llama)
    assert first.built == [0, 2] and second.built == [1] and verify_cache(tmp_path / "c").ok


def test_cli_build_verify_names_a_flipped_byte(tmp_path, capsys):
    out = str(tmp_path / "c")
    args = ["build", "--out", out, "--no-progress", "seq_len=16", "max_sequences=8", "sequences_per_shard=4", "topk=4"]
    assert cache_main(args) == 0
    assert cache_main(["verify", out]) == 0
    victim = max((tmp_path / "c" / "shards").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert cache_main(["verify", out]) == 1
    printed = capsys.readouterr().out
    assert "BAD" in printed and "shard 1" in printed and "FAILED" in printed
    assert cache_main(["inspect", out, "--json"]) == 0


def test_conflicting_config_is_refused_and_names_the_difference(tmp_path, llama):
    build_cache(CacheConfig(**SMALL), tmp_path / "c", progress=False, teacher=llama)
    with pytest.raises(CacheMismatchError, match="topk"):
        build_cache(CacheConfig(**dict(SMALL, topk=4)), tmp_path / "c", progress=False, teacher=llama)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "corpus, error, message",
    [
        (lambda d: _write(d / "empty.txt", b"\n\n"), CorpusError, "empty"),
        (lambda d: _write(d / "latin1.txt", "caf\xe9 au lait".encode("latin-1")), CorpusError, "UTF-8"),
        (lambda d: _write(d / "short.txt", b"Too short."), CorpusError, "fewer than one sequence"),
        (lambda d: str(d / "missing.txt"), CorpusError, "missing.txt"),
    ],
)
def test_bad_corpus_gets_a_clear_error_and_leaves_nothing(tmp_path, llama, corpus, error, message):
    cfg = CacheConfig(**dict(SMALL, corpus=corpus(tmp_path)))
    with pytest.raises(error, match=message):
        build_cache(cfg, tmp_path / "out", progress=False, teacher=llama)
    assert not (tmp_path / "out").exists()


def test_missing_teacher_files_and_unwritable_output(tmp_path, llama):
    with pytest.raises(TeacherLoadError):
        build_cache(CacheConfig(**dict(SMALL, teacher=str(tmp_path / "nope"))), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    if os.geteuid() == 0:
        # root writes anywhere; a path under a regular file is unwritable for everyone
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "cache"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "cache"
    with pytest.raises(OSError, match="cache"):
        build_cache(CacheConfig(**SMALL), target, progress=False, teacher=llama)


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    assert cache_main(["build", "--out", str(tmp_path / "o"), "--no-progress", "topk=0"]) == 2
    assert "cache.topk" in capsys.readouterr().err
    assert cache_main(["build", "--out", str(tmp_path / "o"), "--no-progress", "no_such_key=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_shards_of_a_replaced_manifest_are_not_complete(tmp_path, llama):
    cfg = CacheConfig(**SMALL)
    build_cache(cfg, tmp_path / "c", progress=False, teacher=llama)
    # someone deletes the manifest and builds another corpus into the same folder
    (tmp_path / "c" / "manifest.json").unlink()
    (tmp_path / "other.txt").write_text("\n\n".join(["A different corpus paragraph number %d." % i * 3 for i in range(60)]))
    other = CacheConfig(**dict(SMALL, corpus=str(tmp_path / "other.txt")))
    from lrc_offline.cache import CacheWriter, make_manifest

    manifest = make_manifest(other, build_mod.teacher_geometry(llama.config),
                             {"teacher_config": "a", "teacher_weights": "b", "tokenizer": "c", "corpus": "d"}, 12)  # fmt: skip
    writer = CacheWriter(tmp_path / "c", manifest)
    assert not any(writer.is_complete(i) for i in range(writer.num_shards))
    report = verify_cache(tmp_path / "c")
    assert not report.ok and all("another manifest" in reason for reason in report.bad.values())


def test_host_copies_of_a_batch():
    from lrc_offline.capture.writer import host_ready, to_host

    batch = torch.arange(24.0).view(2, 3, 4)
    copy = to_host(batch)
    host_ready()()
    assert copy.device.type == "cpu" and torch.equal(copy, batch)


@pytest.mark.gpu
def test_host_copies_from_cuda_are_pinned_and_land_before_ready_returns():
    from lrc_offline.capture.writer import host_ready, to_host

    batch = torch.randn(64, 4096, device="cuda")
    copy = to_host(batch * 2)  # the source is a temporary: stream order keeps it valid until copied
    ready = host_ready()
    ready()
    assert copy.is_pinned() and torch.equal(copy, (batch * 2).cpu())
