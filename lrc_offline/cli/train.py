"""`lrc-train`: train LRC students from a cache, sweep sizes, evaluate and export.

    lrc-train train  --cache DIR --out DIR [--config FILE] [--resume auto|never|PATH] [section.key=value ...]
    lrc-train sweep  --cache DIR --out DIR --hidden-sizes 128,192,256 [--config FILE] [section.key=value ...]
    lrc-train eval   --student DIR [--teacher NAME] (--cache DIR | --corpus NAME --heldout-docs N) [--json]
                     (--cache: on the cache's held-out split, no teacher forward; --corpus: the teacher runs)
    lrc-train export --checkpoint DIR --out DIR [--teacher NAME] [--dtype float32|bfloat16|float16]
    lrc-train online --out DIR [--config FILE] [--resume auto|never|PATH] [section.key=value ...]   (the online reference)
    lrc-train plan   CONFIG --num-gpus N [--num-hosts N] [--gpu-tflops X] [--teacher NAME | --teacher-config FILE]
                     [--seq-len N] [--act-positions N] [--cpu] [--json] [section.key=value ...]
                     (memory per GPU and per host, FLOPs per step and tokens/s; docs/scaling.md)
    lrc-train train|sweep|online --help-config | [--config FILE] [section.key=value ...] --print-config

Multi-GPU / multi-node: `accelerate launch --config_file train/accelerate/<file>.yaml -m lrc_offline.cli.train train ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..config import TrainJobConfig
from .common import add_config_args, check_out_dir, dispatch, json_object

__all__ = ["main"]

log = logging.getLogger("lrc-train")


# Options a job command needs unless it only prints its config (so argparse does not require them).
_REQUIRED = {"train": ("--cache", "--out"), "sweep": ("--cache", "--out", "--hidden-sizes"), "online": ("--out",)}


def _add_job_args(parser: argparse.ArgumentParser, cache: bool = True) -> None:
    if cache:
        parser.add_argument("--cache", help="cache directory built by lrc-cache build (required)")
    parser.add_argument("--config", help="JSON or YAML TrainJobConfig; defaults if omitted")
    parser.add_argument("--out", help="run directory (required)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.hidden_size=256 train.steps=500")
    add_config_args(parser, TrainJobConfig)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="lrc-train", description="Train Low-Rank Clone students from a teacher cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one student from a cache")
    _add_job_args(train)
    train.add_argument("--resume", default="auto", help="auto (latest checkpoint in --out), never, or a step-* dir")
    sweep = sub.add_parser("sweep", help="train one student per hidden size from the same cache")
    _add_job_args(sweep)
    sweep.add_argument("--hidden-sizes", help="comma-separated student hidden sizes, e.g. 128,192,256 (required)")
    evaluate = sub.add_parser("eval", help="student vs teacher on held-out text: perplexity, KL, top-1 agreement")
    evaluate.add_argument("--student", required=True, help="exported student directory")
    evaluate.add_argument("--teacher", help="teacher (default: the one the student was trained from)")
    evaluate.add_argument("--cache", help="evaluate on this cache's held-out split, from its stored teacher signal "
                          "(no teacher forward, no corpus); for a cache without one, on its corpus's held-out "
                          "documents with the teacher run")  # fmt: skip
    evaluate.add_argument("--corpus", help="corpus whose last --heldout-docs documents are the held-out text (the "
                          "teacher runs on them)")  # fmt: skip
    evaluate.add_argument("--text-field", default="text")
    evaluate.add_argument("--heldout-docs", type=int, help="documents at the end of the corpus kept out of training")
    evaluate.add_argument("--seq-len", type=int, help="tokens per sequence (default: the cache's, else 256)")
    evaluate.add_argument("--max-sequences", type=int, help="held-out sequences to evaluate (default: a cache's "
                          "whole held-out split, else 32)")  # fmt: skip
    evaluate.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                          help='fsspec options for a --cache on object storage, e.g. \'{"endpoint_url": "http://host:9000"}\' '
                          "(credentials from the environment, never here)")  # fmt: skip
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    export = sub.add_parser("export", help="export a checkpoint as a plain Hugging Face model")
    export.add_argument("--checkpoint", required=True, help="a checkpoints/step-* directory")
    export.add_argument("--out", required=True, help="export directory, or an fsspec URL (s3://bucket/prefix) to upload it to")
    export.add_argument("--teacher", help="the teacher to generate the weights from, where the checkpoint's is elsewhere "
                        "on this machine (a directory, Hub id or .gguf; checked against the fingerprints the "
                        "checkpoint recorded)")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the exported weights (default: the run's export.dtype)")
    online = sub.add_parser("online", help="online reference trainer: the teacher runs in every step")
    _add_job_args(online, cache=False)
    online.add_argument("--resume", default="auto", help="auto (latest checkpoint in --out), never, or a step-* dir")
    plan = sub.add_parser("plan", help="memory per GPU and per host, FLOPs per step and tokens/s of a config, "
                          "under DDP and FSDP2, with and without activation checkpointing")  # fmt: skip
    plan.add_argument("config", help="JSON or YAML TrainJobConfig, e.g. train/llama31_70b_to_4096.yaml")
    plan.add_argument("--num-gpus", type=int, required=True, help="processes (GPUs) of the run")
    plan.add_argument("--num-hosts", type=int, default=1, help="hosts the GPUs are spread over (default 1)")
    plan.add_argument("--gpu-tflops", type=float, help="sustained TFLOP/s of one GPU, for tokens/s (e.g. 400 for "
                      "an H100 at ~40%% of its dense bf16 peak)")  # fmt: skip
    plan.add_argument("--teacher", help="teacher (default: the config's): a directory, a Hub id in the local "
                      "Hugging Face cache or a built-in name; only its config.json is read")  # fmt: skip
    plan.add_argument("--teacher-config", help="the teacher's config.json, where its checkpoint is not here")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (the cache's seq_len; default 2048)")
    plan.add_argument("--act-positions", type=int, default=8, help="clone positions per sequence (the cache's "
                      "act_positions; default 8)")  # fmt: skip
    plan.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32 throughout) instead of GPUs (bf16)")
    plan.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=1")
    add_config_args(plan, TrainJobConfig)
    return parser, sub.choices


def _job_config(args, quiet: bool = False) -> TrainJobConfig:
    from ..config import load_config, to_dict

    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    if not quiet:
        log.info("config: %s", json.dumps(to_dict(cfg)))
    return cfg


def _set_local_device() -> None:
    """Under `accelerate launch`/`torchrun`, make this rank's GPU the current device before anything is
    loaded, so `cuda` means the rank's own GPU and not every rank's cuda:0."""
    import os

    import torch

    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def _teacher_and_heldout(cfg, cache: str):
    """The teacher (the config's, else the cache's) and, for a cache built before held-out splits, its
    held-out documents packed from the corpus (else None: training evaluates on the cache's held-out split,
    reading nothing else). Under train.parallelism=fsdp2 the teacher is returned by name, never loaded
    here: each process then reads only its own shards of the teacher's weights."""
    from ..cache import read_manifest
    from ..evaluation import heldout_sequences
    from ..storage import as_location
    from ..teacher.load import load_teacher, load_tokenizer, resolve_device

    location = as_location(cache, cfg.train.storage_options)
    manifest = read_manifest(location)
    _set_local_device()
    name = cfg.teacher or manifest.teacher_name
    if cfg.train.parallelism == "fsdp2":
        teacher, tokenizer = name, None
    else:
        teacher = load_teacher(name, dtype="auto", device=resolve_device(cfg.train.device))
        tokenizer = teacher.tokenizer
    built = manifest.config
    if manifest.heldout is not None:
        if cfg.heldout_docs:
            log.info("heldout_docs=%d is not used: training evaluates on the cache's held-out split", cfg.heldout_docs)
        return teacher, None
    if cfg.heldout_docs:
        corpus, field, docs, dataset = cfg.corpus, cfg.text_field, cfg.heldout_docs, {}
    else:
        corpus, field, docs, dataset = built.corpus, built.text_field, built.heldout_docs, _dataset_options(built)
    if not docs:
        log.info("no held-out documents (cache built with heldout_docs=0): held-out loss is not logged")
        return teacher, None
    log.warning("the cache at %s has no held-out split (built before caches stored one): every process re-reads "
                "the corpus %s for its last %d documents; rebuild the cache (cache.heldout_docs > 0) to evaluate "
                "from the cache alone", location, corpus, docs)  # fmt: skip
    tokenizer = tokenizer or load_tokenizer(name)
    ids = heldout_sequences(corpus, field, docs, tokenizer, built.seq_len, cfg.train.eval_sequences, **dataset)
    return teacher, ids


def _dataset_options(built) -> dict:
    """The split, configuration and revision a cache config names for a corpus given as a dataset id."""
    return {"split": built.corpus_split, "config": built.corpus_config, "revision": built.corpus_revision}


def _train(args) -> int:
    from ..training.trainer import train_from_cache

    cfg = _job_config(args)
    check_out_dir(args.out)
    teacher, heldout = _teacher_and_heldout(cfg, args.cache)
    summary = train_from_cache(cfg, args.cache, args.out, resume=args.resume, progress=not args.no_progress,
                               teacher=teacher, heldout_ids=heldout)  # fmt: skip
    if _is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


def _is_main_process() -> bool:
    """Whether this is rank 0 (or the only process): under DDP only it prints a run's summary."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _sweep(args) -> int:
    from ..training.sweep import parse_sizes, run_sweep

    cfg = _job_config(args)
    check_out_dir(args.out)
    sizes = parse_sizes(args.hidden_sizes)
    teacher, heldout = _teacher_and_heldout(cfg, args.cache)
    run_sweep(cfg, args.cache, args.out, sizes, teacher=teacher, heldout_ids=heldout, progress=not args.no_progress)
    if _is_main_process():
        print((Path(args.out) / "sweep.md").read_text())
    return 0


def _eval(args) -> int:
    from ..cache import read_manifest
    from ..evaluation import evaluate_export, evaluate_export_from_cache, format_table
    from ..storage import as_location, check_storage_options
    from ..teacher.load import load_teacher

    if not (Path(args.student) / "config.json").is_file():
        what = "is not an exported student (no config.json)" if Path(args.student).is_dir() else "does not exist"
        raise FileNotFoundError(f"--student {args.student} {what}; pass the student/ folder of a run or an "
                                "lrc-train export directory")  # fmt: skip
    info_file = Path(args.student) / "lrc_config.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    teacher_name = args.teacher or (info.get("config") or {}).get("teacher")
    corpus, field, docs, seq_len = args.corpus, args.text_field, args.heldout_docs, args.seq_len
    dataset = {}
    if args.cache:
        cache = as_location(args.cache, check_storage_options(args.storage_options, "--storage-options"))
        manifest = read_manifest(cache)
        if manifest.heldout is not None and not args.corpus:
            metrics = evaluate_export_from_cache(args.student, cache, args.max_sequences, args.teacher)
            print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
            return 0
        built = manifest.config
        teacher_name = teacher_name or manifest.teacher_name
        if not corpus:
            corpus, field = built.corpus, built.text_field
            dataset = _dataset_options(built)
            log.warning("the cache at %s has no held-out split (built before caches stored one): its corpus is read "
                        "and the teacher runs on the held-out documents; rebuild the cache (cache.heldout_docs > 0) "
                        "to evaluate from its stored signal", args.cache)  # fmt: skip
        docs, seq_len = docs or built.heldout_docs, seq_len or built.seq_len
    if not teacher_name:
        raise FileNotFoundError(f"{info_file} does not name the teacher; pass --teacher")
    if not corpus or not docs:
        raise FileNotFoundError("no held-out text: pass --cache (built with heldout_docs > 0) or --corpus and --heldout-docs")
    teacher = load_teacher(teacher_name, dtype="auto", device="auto")
    metrics = evaluate_export(args.student, teacher, corpus, docs, seq_len or 256, args.max_sequences or 32, field,
                              **dataset)  # fmt: skip
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
    return 0


def _export(args) -> int:
    from ..training.export_checkpoint import export_checkpoint

    check_out_dir(args.out)
    print(export_checkpoint(args.checkpoint, args.out, teacher=args.teacher, dtype=args.dtype))
    return 0


def _plan(args) -> int:
    from ..training.plan import format_plan, plan, teacher_geometry

    cfg = _job_config(args, quiet=True)
    geo = teacher_geometry(args.teacher or cfg.teacher, args.teacher_config)
    rows = plan(cfg, geo, args.seq_len or 2048, args.num_gpus, args.num_hosts, args.gpu_tflops, args.act_positions,
                bf16=not args.cpu)  # fmt: skip
    print(json.dumps(rows, indent=2) if args.json else format_plan(rows, geo, cfg.student.hidden_size))
    return 0


def _online(args) -> int:
    from ..online import train_online

    cfg = _job_config(args)
    check_out_dir(args.out)
    summary = train_online(cfg, args.out, progress=not args.no_progress, resume=args.resume)
    if _is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


_RESUMES = "complete checkpoints are kept, and a rerun resumes from the latest"
_KEPT_ON_FULL_DISK = {"train": _RESUMES, "sweep": _RESUMES, "online": _RESUMES,
                      "export": "no partial export is left"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    handlers = {"train": _train, "sweep": _sweep, "eval": _eval, "export": _export, "online": _online, "plan": _plan}
    configs = {command: lambda args: _job_config(args, quiet=True) for command in (*_REQUIRED, "plan")}
    return dispatch(_parser, argv, handlers, configs, _REQUIRED, kept=_KEPT_ON_FULL_DISK)


if __name__ == "__main__":
    sys.exit(main())
