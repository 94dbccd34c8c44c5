"""A training checkpoint exported as a plain Hugging Face model (`lrc-train export`): the student is rebuilt
from the teacher's weights and the checkpoint's projections and materialised by `student.export`, with the
run's provenance (steps, tokens, last held-out figures) for its model card."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from ..config import TrainJobConfig, from_dict
from ..storage import as_location, is_url
from ..student.export import export_dtype, export_student
from ..student.lrc import build_student
from ..teacher.load import load_teacher
from .checkpoint import load_student_weights, read_checkpoint_state
from .metrics import read_metrics
from .trainer import check_teacher_matches_cache

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str, teacher: str | None = None,
                      dtype: str | None = None) -> str:  # fmt: skip
    """Export the student of a `checkpoints/step-*` directory to `out_dir` (a folder, or an fsspec URL:
    exported locally, then uploaded with `config.json` last).

    Args:
        teacher: The teacher to generate the student's weights from (default: the run's); a checkpoint
            trained from a cache must get the teacher the cache was built with.
        dtype: float32, bfloat16 or float16 (default: the run's `export.dtype`).

    Returns:
        Where the export is: the folder, or the URL.

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
        TeacherMismatchError: `teacher` is not the one the checkpoint's cache was built with.
        FileExistsError: the URL already holds an export.
    """
    state = read_checkpoint_state(checkpoint_dir)
    cfg = from_dict(TrainJobConfig, state["config"], f"{checkpoint_dir}/state.json config")
    teacher_name = teacher or cfg.teacher
    loaded = load_teacher(teacher_name, dtype="float32", device="cpu")
    fingerprints = state.get("extra", {}).get("cache_fingerprints")
    if fingerprints:  # the student's weights are generated from the teacher's: it must be the same teacher
        check_teacher_matches_cache(loaded.model, loaded.tokenizer, teacher_name, fingerprints,
                                    f"{cfg.teacher!r} (as it was then)", f"the checkpoint {checkpoint_dir}")
    student = build_student(loaded.model, cfg.student)
    load_student_weights(checkpoint_dir, student)
    extra = {"trainer": "offline", "steps": state["step"], "checkpoint": str(checkpoint_dir),
             **_logged_at(Path(checkpoint_dir), state["step"]), **state.get("extra", {})}  # fmt: skip
    weights_dtype = export_dtype(dtype or cfg.export.dtype)
    if not is_url(out_dir):
        return str(export_student(student, out_dir, loaded.tokenizer, state["config"], dtype=weights_dtype,
                                  extra_info=extra))  # fmt: skip
    target = as_location(out_dir)  # object storage: export locally, then upload the finished folder
    if target.is_file("config.json"):
        raise FileExistsError(f"{target} already holds an export (config.json); choose another --out")
    with tempfile.TemporaryDirectory(prefix="lrc-export-") as tmp:
        export_student(student, Path(tmp) / "student", loaded.tokenizer, state["config"], dtype=weights_dtype,
                       extra_info=extra)  # fmt: skip
        target.upload(Path(tmp) / "student", "", last=("config.json",))  # readers look for config.json
    return str(target)


def _logged_at(checkpoint: Path, step: int) -> dict:
    """Training tokens and the last held-out CE up to `step`, from the run's metrics.jsonl when the checkpoint
    still sits in its run directory (`<run>/checkpoints/step-*`), for the model card."""
    path = checkpoint.resolve().parent.parent / "metrics.jsonl"
    records = [r for r in read_metrics(path) if r.get("step", step + 1) <= step] if path.is_file() else []
    out = {"tokens": records[-1].get("tokens")} if records else {}
    held = [r for r in records if "heldout_ce" in r]
    if held:
        ce = held[-1]["heldout_ce"]
        out["heldout"] = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "step": held[-1]["step"],
                          **({"kl": held[-1]["heldout_kl"], "top1": held[-1]["heldout_top1"]}
                             if "heldout_kl" in held[-1] else {})}  # fmt: skip
    return out
