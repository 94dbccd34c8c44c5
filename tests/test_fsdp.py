"""train.parallelism=fsdp2: a sharded student trains like the whole one, resumes exactly, reshards; each
process reads only its shards of the teacher from its files, and trains exactly as when every process
loaded the whole teacher (`LRC_FSDP2_WHOLE_TEACHER=1`).

Every sharded run is a subprocess (FSDP2 needs a process group, which must not outlive the run in the
test process): one process here, two under torchrun in the slow tier.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig, ConfigError, OptimConfig, StudentConfig, TrainConfig, TrainJobConfig
from lrc_offline.student.lrc import build_student
from lrc_offline.teacher.fingerprint import teacher_fingerprints
from lrc_offline.teacher.load import load_teacher
from lrc_offline.teacher.slices import TeacherFiles, file_fingerprints, open_file_teacher
from lrc_offline.teacher.tiny import tiny_teacher, tiny_tokenizer
from lrc_offline.training import checkpoint as ckpt
from lrc_offline.training.trainer import WHOLE_TEACHER_ENV
from lrc_offline.training.metrics import read_metrics
from lrc_offline.training.trainer import train_from_cache

STEPS = 3
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# The run both kinds of test launch: argv = parallelism, out_dir[, options: checkpointing (activation
# checkpointing), pca (PCA start with a tied head and the head-scale fit)]. Residual activations at every
# position, so every clone term (o and down through their projected targets too) sends gradients into P.
# Each process writes what it held of the teacher: `teacher-R.json` with the bytes of teacher tensors in
# its student and the bytes it read from the teacher's files to build it (per-rank reads), or `whole-R`
# when it loaded the whole teacher.
_RUN = """
import json, os, sys, torch
import lrc_offline.training.loop as loop
import lrc_offline.training.trainer as trainer
from lrc_offline.config import OptimConfig, StudentConfig, TrainConfig, TrainJobConfig
from lrc_offline.training.fsdp import teacher_bytes_held
from lrc_offline.training.trainer import train_from_cache
rank = os.environ.get("RANK", "0")
build, load = loop.build_sharded_student, trainer.load_teacher
def recorded_build(files, cfg, device):
    before = files.files.bytes_read
    student = build(files, cfg, device)
    record = {{"held": teacher_bytes_held(student), "read": files.files.bytes_read - before}}
    open(os.path.join(sys.argv[2] + "-teacher-" + rank + ".json"), "w").write(json.dumps(record))
    return student
def recorded_load(*args, **kwargs):
    open(sys.argv[2] + "-whole-" + rank, "w").close()
    return load(*args, **kwargs)
loop.build_sharded_student, trainer.load_teacher = recorded_build, recorded_load
pca = "pca" in sys.argv[3:]
student = StudentConfig(init="pca", head="tied", hidden_size=32, pca_calibrate_sequences=4) if pca else StudentConfig(init="random")
cfg = TrainJobConfig(student=student, optim=OptimConfig(lr=1e-2, warmup_steps=2),
                     train=TrainConfig(steps={steps}, batch_size=2, grad_accum=2, log_every=1, device="cpu",
                                       parallelism=sys.argv[1], checkpoint_every=2, eval_every=2,
                                       activation_checkpointing="checkpointing" in sys.argv[3:]))
heldout = torch.arange(4 * 32).reshape(4, 32) % 97
train_from_cache(cfg, {cache!r}, sys.argv[2], progress=False, heldout_ids=heldout)
"""

# Load a checkpoint into a freshly sharded student and optimiser on however many processes run it, then
# write (rank 0) the gathered parameters and Adam moments: argv = checkpoint, output file.
_LOAD = """
import sys, torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from lrc_offline.config import OptimConfig, StudentConfig
from lrc_offline.student.lrc import build_student
from lrc_offline.teacher.load import load_teacher
from lrc_offline.training.checkpoint import load_checkpoint
from lrc_offline.training.fsdp import full_trainable_state, shard_student
from lrc_offline.training.optim import build_optimizer
student = build_student(load_teacher("tiny-random:llama").model, StudentConfig(init="random", seed=7))
shard_student(student, torch.device("cpu"))
optimizer, scheduler = build_optimizer(student, OptimConfig(lr=1e-2, warmup_steps=2), 3)
load_checkpoint(sys.argv[1], student, optimizer, scheduler)
weights = full_trainable_state(student)
options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
moments = get_optimizer_state_dict(student, optimizer, options=options)["state"]
if torch.distributed.get_rank() == 0:
    out = dict(weights)
    for name, state in moments.items():
        out[name + ".exp_avg"], out[name + ".exp_avg_sq"] = state["exp_avg"], state["exp_avg_sq"]
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp") / "cache"
    cfg = CacheConfig(teacher="tiny-random:llama", corpus="tiny-text", seq_len=32, max_sequences=48,
                      sequences_per_shard=8, logit_mode="hidden", activation_mode="residual", act_positions=32,
                      act_dtype="float32")  # fmt: skip
    build_cache(cfg, root, progress=False)
    return root


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _launch(script: Path, *args, processes: int = 1, whole_teacher: bool = False) -> None:
    if processes == 1:
        command = [sys.executable, str(script), *map(str, args)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(script),
                   *map(str, args)]  # fmt: skip
    env = {k: v for k, v in _ENV.items() if k != WHOLE_TEACHER_ENV} | ({WHOLE_TEACHER_ENV: "1"} if whole_teacher else {})
    subprocess.run(command, check=True, timeout=600, env=env)


def _teacher_bytes(run_dir: Path, processes: int) -> list[dict]:
    """What each process of a sharded run held of the teacher; refuses a run where one loaded it whole."""
    assert not list(run_dir.parent.glob(run_dir.name + "-whole-*")), f"{run_dir}: a process loaded the whole teacher"
    return [json.loads(Path(f"{run_dir}-teacher-{rank}.json").read_text()) for rank in range(processes)]


def _teacher_tensor_bytes(name: str = "tiny-random:llama") -> int:
    """Bytes of the teacher's tensors a student holds: every parameter, the embedding twice when an
    untied student's head is the tied teacher's embedding (not in these runs)."""
    return sum(p.numel() * p.element_size() for p in load_teacher(name).model.parameters())


# How far apart two runs that sum the same gradients in another order may end up.
#
# A whole student generates its weights once per step under grad_accum 2, a sharded one per micro-batch;
# which kernel sums a reduction, and in what order, also depends on the CPU's instruction set
# (ATEN_CPU_CAPABILITY=default|avx2|avx512). So the gradients agree to fp32 rounding of the magnitudes
# summed, which is far above the gradient itself where the contributions of tokens (or of the two steps,
# in Adam's first moment) cancel. Adam then turns every element's gradient into a step of about the
# learning rate whatever its size (m / sqrt(v)): an element whose m is a small difference of large terms
# carries its rounding into its update amplified by |g| / |m|. The differences are therefore measured in
# units of the distance Adam can move an element, the learning rate summed over the steps taken
# (`LR_SUM`), elementwise; and per tensor, where such elements are few, in relative Frobenius norm.
# Measured between the two summation orders, under avx512 (the worst of the three): worst element
# 1.5e-3 of LR_SUM (layers.0.proj.up), worst tensor 2.3e-5 relative; default and avx2 below both.
# The bounds keep ~10x over that. A wrong gradient, a skipped or repeated micro-batch moves elements by
# a sizeable fraction of LR_SUM and whole tensors by far more than 2e-4.
LR_SUM = 1e-2 * (1 / 2 + 1 + 1)
"""The learning rates of the 3 steps of `_RUN` (peak 1e-2, 2 warmup steps, then decay from the peak):
an upper bound of the distance Adam moves any element (|m^ / sqrt(v^)| <= ~1 per step)."""
ELEMENT_TOL, TENSOR_TOL = 2e-2 * LR_SUM, 2e-4


def _assert_same_weights(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """Weights of two runs that differ only in the order their gradients were summed (see above). `scale`:
    the largest factor a weight of `wa` applies to its projections' elements (1 for the projections
    themselves; W^S = W^T P is linear in P with |W^T| entries up to `scale`)."""
    assert set(wa) == set(wb)
    for name in wa:
        diff = (wa[name].float() - wb[name].float())
        assert diff.abs().max() <= ELEMENT_TOL * scale, (name, diff.abs().max().item())
        assert diff.norm() <= TENSOR_TOL * max(wb[name].float().norm(), 1e-12), (name, diff.norm().item())


def _assert_same_run(a: Path, b: Path, rel: float = 1e-5) -> None:
    """Same losses, clone terms, grad norms and held-out CE at every step; same exported weights (exactly,
    with `rel` 0; else within the bounds of two summation orders)."""
    lines_a, lines_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in lines_a] == [r["step"] for r in lines_b]
    for ra, rb in zip(lines_a, lines_b):
        keys = [k for k in ra if k == "loss" or k.startswith(("clone", "kd", "ce", "grad_norm", "heldout"))]
        assert keys and set(keys) <= set(rb)
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-6), (ra["step"], key)
    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    if rel == 0:
        assert set(wa) == set(wb) and all(torch.equal(wa[n], wb[n]) for n in wa)
        return
    teacher = load_teacher("tiny-random:llama").model
    _assert_same_weights(wa, wb, scale=max(p.abs().max().item() for p in teacher.parameters()) * 64)


def _interrupt_after_step_2(run_dir: Path, copy: Path) -> Path:
    """`run_dir` as a run killed after its step-2 checkpoint would have left it."""
    shutil.copytree(run_dir, copy)
    for later in ("checkpoints/step-000003", "student", "summary.json"):
        shutil.rmtree(copy / later) if (copy / later).is_dir() else (copy / later).unlink()
    return copy


# ---- one process (CPU tier) -----------------------------------------------------------------------------


def test_sharded_run_on_one_process_equals_plain_and_resumes_exactly(cache, tmp_path):
    run = _script(tmp_path, "run.py", _RUN.format(steps=STEPS, cache=str(cache)))
    _launch(run, "ddp", tmp_path / "plain")
    _launch(run, "fsdp2", tmp_path / "sharded")
    _assert_same_run(tmp_path / "plain", tmp_path / "sharded")
    # The sharded run read its teacher from the files, every tensor once, and loaded it whole nowhere.
    (held,) = _teacher_bytes(tmp_path / "sharded", 1)
    assert held["held"] == held["read"] == _teacher_tensor_bytes()
    assert list(tmp_path.glob("plain-whole-*"))  # the plain run still loads it whole
    step2 = tmp_path / "sharded" / "checkpoints" / "step-000002"
    assert (step2 / ckpt.SHARDED_DIR).is_dir() and not (step2 / "student.safetensors").exists()

    # The sharded checkpoint's parameters read into a whole student in this process (export from a
    # checkpoint) equal the plain run's checkpoint of the same step.
    teacher = load_teacher("tiny-random:llama")
    student = build_student(teacher.model, StudentConfig(init="random", seed=3))
    state = ckpt.load_student_weights(step2, student)
    assert state["step"] == 2
    plain = load_file(tmp_path / "plain" / "checkpoints" / "step-000002" / "student.safetensors")
    _assert_same_weights({name: param.detach() for name, param in student.named_parameters()}, plain)

    resumed = _interrupt_after_step_2(tmp_path / "sharded", tmp_path / "resumed")
    _launch(run, "fsdp2", resumed)
    _assert_same_run(tmp_path / "sharded", resumed, rel=0)


def test_sharded_checkpoint_is_refused_by_a_plain_run(cache, tmp_path):
    run = _script(tmp_path, "run.py", _RUN.format(steps=2, cache=str(cache)))
    _launch(run, "fsdp2", tmp_path / "out")
    cfg = TrainJobConfig(student=StudentConfig(init="random"), optim=OptimConfig(lr=1e-2, warmup_steps=2),
                         train=TrainConfig(steps=4, batch_size=2, grad_accum=2, log_every=1, device="cpu",
                                           checkpoint_every=2, eval_every=2))  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match="train.parallelism"):
        train_from_cache(cfg, cache, tmp_path / "out", progress=False)


def test_parallelism_is_checked():
    with pytest.raises(ConfigError, match="parallelism"):
        TrainConfig(parallelism="fsdp")


def test_per_rank_teacher_equals_whole_teacher_with_pca_start(cache, tmp_path):
    """The PCA start (tied head: its rotation from the embedding read in blocks; the head-scale fit through
    the sharded forward) and the export of a student built from the teacher's files are those of the
    student sharded from the whole teacher, bit for bit."""
    run = _script(tmp_path, "run.py", _RUN.format(steps=2, cache=str(cache)))
    _launch(run, "fsdp2", tmp_path / "whole", "pca", whole_teacher=True)
    _launch(run, "fsdp2", tmp_path / "files", "pca")
    assert list(tmp_path.glob("whole-whole-*")) and _teacher_bytes(tmp_path / "files", 1)
    _assert_same_run(tmp_path / "whole", tmp_path / "files", rel=0)
    init = [ckpt.read_checkpoint_state(tmp_path / r / "checkpoints" / "step-000002")["extra"]["init"] for r in ("whole", "files")]
    assert init[0] == init[1] and init[0]["head_scale"] != 1.0  # the fit ran, to the same scale


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_teacher_files_read_rows_and_fingerprint_as_the_loaded_teacher(family, tmp_path):
    """Rows [a, b) read from a teacher's safetensors files are the loaded tensor's rows (every dtype the
    checkpoint may hold read in the training dtype), and the weights hashed from the files a block of
    rows at a time fingerprint the teacher exactly as the teacher loaded whole does (tied head once,
    biases, q/k norms)."""
    model = tiny_teacher(family)
    model.save_pretrained(tmp_path / "fp32", safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path / "fp32")
    files = TeacherFiles(tmp_path / "fp32")
    q = model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(files.read("model.layers.1.self_attn.q_proj.weight", (5, 37)), q[5:37])
    assert files.read("model.layers.1.self_attn.q_proj.weight", (64, 64)).shape == (0, 64)
    assert files.bytes_read == 32 * 64 * 4
    blocks = list(files.row_blocks("model.embed_tokens.weight", 100))
    assert [len(b) for b in blocks][:2] == [100, 100] and torch.equal(torch.cat(blocks), model.model.embed_tokens.weight)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    assert torch.equal(TeacherFiles(tmp_path / "bf16").read("model.norm.weight", dtype=torch.float32),
                       model.model.norm.weight.float())  # fmt: skip

    teacher = open_file_teacher(str(tmp_path / "fp32"), torch.float32)
    assert all(p.is_meta for p in teacher.model.parameters())
    assert teacher.model.model.rotary_emb.inv_freq.is_meta is False  # computed, not left for the files
    loaded = load_teacher(str(tmp_path / "fp32"))
    assert file_fingerprints(teacher, rows_per_block=7) == teacher_fingerprints(loaded.model, loaded.tokenizer)
    # A built-in name reads the directory it is saved to; its fingerprints are the in-process teacher's.
    builtin = open_file_teacher(f"tiny-random:{family}", torch.float32)
    in_process = load_teacher(f"tiny-random:{family}")
    assert file_fingerprints(builtin) == teacher_fingerprints(in_process.model, in_process.tokenizer)


# ---- two processes (slow tier) ------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_equals_ddp_on_two_processes_resumes_and_reshards(cache, tmp_path):
    """3 steps (grad_accum 2, every clone term, held-out evaluation) under FSDP2 equal DDP, with activation
    checkpointing too; a run resumed
    from its step-2 checkpoint equals the uninterrupted one; the checkpoint of two processes loads its
    weights and Adam moments identically on one process and on two."""
    run = _script(tmp_path, "run.py", _RUN.format(steps=STEPS, cache=str(cache)))
    _launch(run, "ddp", tmp_path / "ddp", processes=2)
    _launch(run, "fsdp2", tmp_path / "fsdp2", processes=2)
    _assert_same_run(tmp_path / "ddp", tmp_path / "fsdp2")
    # Each process read and holds its half of the teacher (FSDP2's dim-0 chunks), nothing more.
    held = _teacher_bytes(tmp_path / "fsdp2", 2)
    assert all(h["held"] == h["read"] for h in held) and sum(h["held"] for h in held) == _teacher_tensor_bytes()
    assert max(h["held"] for h in held) <= 0.55 * _teacher_tensor_bytes()
    _launch(run, "fsdp2", tmp_path / "fsdp2-whole", processes=2, whole_teacher=True)
    _assert_same_run(tmp_path / "fsdp2-whole", tmp_path / "fsdp2", rel=0)
    # Sharded layers that recompute their weights and activations in the backward train the same.
    _launch(run, "fsdp2", tmp_path / "fsdp2-checkpointing", "checkpointing", processes=2)
    _assert_same_run(tmp_path / "fsdp2", tmp_path / "fsdp2-checkpointing")
    step2 = tmp_path / "fsdp2" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (step2 / ckpt.SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    resumed = _interrupt_after_step_2(tmp_path / "fsdp2", tmp_path / "resumed")
    _launch(run, "fsdp2", resumed, processes=2)
    _assert_same_run(tmp_path / "fsdp2", resumed, rel=0)

    load = _script(tmp_path, "load.py", _LOAD)
    _launch(load, step2, tmp_path / "one.safetensors", processes=1)
    _launch(load, step2, tmp_path / "two.safetensors", processes=2)
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert set(one) == set(two) and any(k.endswith(".exp_avg_sq") for k in one)
    for name in one:
        assert torch.equal(one[name], two[name]), name
    ddp = load_file(tmp_path / "ddp" / "checkpoints" / "step-000002" / "student.safetensors")
    _assert_same_weights({name: one[name] for name in ddp}, ddp)

    # Resumed on one process from two processes' checkpoint: trains on to the end, tokens counted on.
    reshard = _interrupt_after_step_2(tmp_path / "fsdp2", tmp_path / "reshard")
    _launch(run, "fsdp2", reshard, processes=1)
    lines = read_metrics(reshard / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    tokens_per_step_one_process = 2 * 2 * 32
    assert lines[-1]["tokens"] == lines[-2]["tokens"] + tokens_per_step_one_process
