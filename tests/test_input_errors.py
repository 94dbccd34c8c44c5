"""Bad input that used to end in a traceback, a silent default or a leaked credential: each gives one line
(stderr or log) naming the file or field and the fix, exit status 2 where the command cannot go on, and
leaves nothing written."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrc_offline.cache import verify_cache
from lrc_offline.cli.cache import main as cache_main
from lrc_offline.cli.train import main as train_main
from lrc_offline.config import ConfigError, StudentConfig, TrainJobConfig, load_config
from lrc_offline.data.sources import CorpusError, iter_documents
from lrc_offline.storage import Location, StorageError, check_storage_options
from lrc_offline.student.export import export_student
from lrc_offline.student.lrc import build_student
from lrc_offline.teacher.load import load_teacher
from lrc_offline.teacher.tiny import tiny_teacher, tiny_tokenizer

from test_cli_errors import _one_line_error  # noqa: E402 -- the tests folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
TINY_CACHE = ["max_sequences=16", "sequences_per_shard=8", "seq_len=32", "topk=16", "act_positions=8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("input-errors") / "cache"
    assert cache_main(["build", "--out", str(out), "--no-progress", *TINY_CACHE]) == 0
    return out


def test_binary_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "some.bin"
    config.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    assert cache_main(["build", "--config", str(config), "--out", str(out)]) == 2
    _one_line_error(capsys, str(config), "not a text file")
    assert train_main(["train", "--config", str(config), "--cache", str(tmp_path), "--out", str(out)]) == 2
    _one_line_error(capsys, str(config), "not a text file")
    assert not out.exists()


def test_adam_betas_out_of_range_are_refused_before_the_run_directory(tmp_path, capsys):
    for override in ("optim.betas=[2,3]", "optim.betas=[0.9,1]", "optim.weight_decay=-0.1", "optim.min_lr_ratio=2"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(TrainJobConfig, None, [override])
    out = tmp_path / "run"
    assert train_main(["train", "--cache", str(tmp_path / "cache"), "--out", str(out), "optim.betas=[2,3]"]) == 2
    _one_line_error(capsys, "optim.betas", "[0, 1)")
    assert not out.exists()


def _run_with_file_size_limit(limit: int, *argv: str) -> subprocess.CompletedProcess:
    """A CLI in a child whose writes past `limit` bytes per file fail with EFBIG, as on a full disk."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_writes, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith(("INFO", "WARNING"))]


def test_full_disk_during_a_build_is_one_line_and_a_rerun_completes(tmp_path, capsys):
    out = tmp_path / "cache"
    # the log-probs of a shard (16 x 64 tokens x 64 float32, not the default float16) pass the limit; the index
    # (70 kB) and manifest do not
    argv = ["lrc_offline.cli.cache", "build", "--out", str(out), "--no-progress", "max_sequences=32",
            "sequences_per_shard=16", "seq_len=64", "topk=64", "act_positions=8", "logprob_dtype=float32"]  # fmt: skip
    proc = _run_with_file_size_limit(120_000, *argv)
    lines = _error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "no space left writing" in lines[0] and str(out) in lines[0] and "complete shards are kept" in lines[0]
    assert (out / "index" / "part-000000.json").is_file() and not verify_cache(out).complete
    assert cache_main(argv[1:]) == 0  # the same build, with space, on what the full disk left
    assert verify_cache(out).ok


def test_full_disk_during_a_checkpoint_save_is_one_line(cache, tmp_path):
    out = tmp_path / "run"
    proc = _run_with_file_size_limit(60_000, "lrc_offline.cli.train", "train", "--cache", str(cache), "--out",
                                     str(out), "--no-progress", "train.steps=1", "train.batch_size=4",
                                     "student.init=random")  # fmt: skip
    lines = _error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "no space left writing" in lines[0] and "rerun resumes from the latest" in lines[0]
    assert not list((out / "checkpoints").iterdir())  # no half-written checkpoint


def _edit_manifest(cache: Path, copy: Path, **changes) -> Path:
    import shutil

    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_inspect_of_an_edited_fingerprint_or_a_cache_without_shards(cache, tmp_path, capsys):
    fingerprints = json.loads((cache / "manifest.json").read_text())["fingerprints"]
    edited = _edit_manifest(cache, tmp_path / "edited", fingerprints={**fingerprints, "teacher_config": "sha256:0"})
    assert cache_main(["inspect", str(edited)]) == 0  # its shards were built under another manifest: none counts
    printed = capsys.readouterr().out
    assert "complete_shards    0" in printed and "no complete shard" in printed and "lrc-cache verify" in printed
    garbage = _edit_manifest(cache, tmp_path / "garbage", fingerprints=["ab", "cd"])
    assert cache_main(["inspect", str(garbage)]) == 2
    _one_line_error(capsys, "manifest.json", "fingerprints")


def test_out_that_is_a_file_is_refused_before_anything_loads(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cache = str(tmp_path / "no-cache")
    for main, argv in [
        (cache_main, ["build", "--no-progress"]),
        (train_main, ["train", "--cache", cache]),
        (train_main, ["sweep", "--cache", cache, "--hidden-sizes", "16,32"]),
        (train_main, ["online", "teacher=tiny-random:llama"]),
        (train_main, ["export", "--checkpoint", str(tmp_path / "no-checkpoint")]),
    ]:  # fmt: skip
        assert main([*argv, "--out", str(afile)]) == 2
        _one_line_error(capsys, str(afile), "is a file")
        assert main([*argv, "--out", str(afile / "sub")]) == 2
        _one_line_error(capsys, str(afile / "sub"), "is a file")
    assert afile.read_text() == "mine"


def _teacher_dir(path: Path, **config) -> Path:
    tiny_teacher("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data.update(config)
    (path / "config.json").write_text(json.dumps(data))
    return path


_AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig",
             "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}  # fmt: skip


def test_teacher_with_custom_code_of_a_built_in_architecture_exports(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING, "lrc_offline.teacher.load"):
        teacher = load_teacher(str(_teacher_dir(tmp_path / "teacher", auto_map=_AUTO_MAP)))
    student = build_student(teacher.model, StudentConfig(hidden_size=32, init="random"))
    out = export_student(student, tmp_path / "student", teacher.tokenizer)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        assert torch.allclose(exported, student(ids).logits_BTV, atol=1e-4)
    assert "auto_map" in caplog.text  # the user is told the custom code is not what runs


def test_teacher_with_custom_code_of_another_architecture_is_refused(tmp_path, capsys):
    teacher = _teacher_dir(tmp_path / "teacher", auto_map=_AUTO_MAP, model_type="custom_llm")
    capsys.readouterr()  # the progress bar of save_pretrained
    out = tmp_path / "cache"
    assert cache_main(["build", "--out", str(out), f"teacher={teacher}", "--no-progress"]) == 2
    _one_line_error(capsys, str(teacher), "auto_map", "custom_llm", "llama")
    assert not out.exists()


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:SECRETKEY@bucket/c",
                                 "s3://bucket/c?access_key=AKIAEXAMPLE&secret=SECRETKEY"])  # fmt: skip
def test_credentials_in_a_url_are_never_printed(url, capsys):
    for argv in (["verify", url], ["inspect", url], ["build", "--out", url, "--no-progress"]):
        assert cache_main(argv) == 2
        err = _one_line_error(capsys, "s3://", "bucket/c", "credentials")
        assert "SECRETKEY" not in err and "AKIAEXAMPLE" not in err


def test_redact_url_masks_passwords_keys_and_signed_queries():
    from lrc_offline.storage import redact_url

    assert redact_url("s3://AKIA:SECRET@bucket/c") == "s3://***@bucket/c"
    assert redact_url("error: s3://b/c?access_key=A&secret=S&region=eu: refused") == \
        "error: s3://b/c?access_key=***&secret=***&region=eu: refused"  # fmt: skip
    signed = "https://h/o?X-Amz-Credential=A%2F1&X-Amz-Signature=abc&X-Amz-Expires=60&sig=x&token=t"
    masked = "https://h/o?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60&sig=***&token=***"
    assert redact_url(signed) == masked and redact_url(masked) == masked
    for plain in ("az://container@account/p", "s3://bucket/prefix", "/data/cache", "gs://b/p?generation=3"):
        assert redact_url(plain) == plain
    assert str(Location("memory://bucket/prefix")) == "memory://bucket/prefix"
    with pytest.raises(StorageError) as refused:
        check_storage_options({"client_kwargs": {"endpoint_url": "https://h/?token=T0KEN"}}, "s3://b?token=T0KEN")
    assert "T0KEN" not in str(refused.value)


def test_empty_config_file_says_every_key_is_default(tmp_path, capsys, caplog):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    with caplog.at_level(logging.WARNING, "lrc_offline.config"):
        assert cache_main(["build", "--config", str(empty), "--print-config"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(empty) in warnings[0] and "default" in warnings[0]
    assert "teacher: tiny-random:llama" in capsys.readouterr().out


def test_directory_given_as_config_is_named_a_directory(tmp_path, capsys):
    assert train_main(["train", "--config", str(tmp_path), "--cache", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, str(tmp_path), "is a directory")


def test_json_lines_records_without_the_text_field_are_counted(tmp_path, caplog):
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a b"}, {"body": "x"}, {"text": "c d"}]))
    with caplog.at_level(logging.WARNING, "lrc_offline.data.sources"):
        assert list(iter_documents(str(some))) == ["a b", "c d"]
    assert f"{some}: 1 of 3 records have no 'text' field" in caplog.text
    most = tmp_path / "most.jsonl"
    most.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a b"}, {"body": "x"}, {"body": "y"}]))
    with pytest.raises(CorpusError, match=r"most\.jsonl: 2 of 3 records have no 'text' field.*cache\.text_field"):
        list(iter_documents(str(most)))
