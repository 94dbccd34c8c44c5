"""`lrc-cache`: build, plan, inspect and verify a teacher cache.

    lrc-cache tokenize --config FILE --out DIR [--worker-index I --num-workers N] [key=value ...]
    lrc-cache build --config FILE --out DIR [--worker-index I [--num-workers N]] [key=value ...]
    lrc-cache build --help-config | [--config FILE] [key=value ...] --print-config
    lrc-cache plan [CONFIG | --config FILE] --tokens N [--gpu-tflops T] [--teacher-config PATH]
                   [--ratios-from CACHE] [--doc-tokens N] [--json] [key=value ...]
    lrc-cache inspect DIR [--json]
    lrc-cache verify DIR
    lrc-cache clean DIR [--all] [--derived]   (after a killed build: remove its leftovers; never during a build)

Worker I of N tokenises corpus units I, I+N, ... and builds shards I, I+N, ...; under a Slurm array or
torchrun/accelerate the split comes from the launcher. --shard-index/--num-shards are deprecated names of
--worker-index/--num-workers. With run.tensor_parallel_size=T (torchrun --nproc-per-node T or a multiple)
each group of T processes is one worker (docs/tensor_parallel.md).

DIR may be an fsspec URL (s3://bucket/prefix, gs://..., file://...), reached through the standard
credential chain (environment, AWS_ENDPOINT_URL, AWS_PROFILE, instance role) and the filesystem's
options: cache.run.storage_options for build and tokenize, --storage-options JSON for the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..config import CacheConfig, load_config
from .common import add_config_args, check_out_dir, dispatch, json_object, launcher_rank

__all__ = ["main"]

log = logging.getLogger("lrc-cache")


class _DeprecatedFlag(argparse.Action):
    """An old name of a flag: sets the new one's value and is noted, to be warned about once logging is set up
    (`_warn_deprecated`)."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.deprecated_flags = [*namespace.deprecated_flags, (option_string, self.new_flag)]


def _warn_deprecated(args) -> None:
    if args.deprecated_flags:
        used = sorted(set(args.deprecated_flags), key=lambda pair: pair[1] != "--worker-index")  # index first
        old, new = (", ".join(names) for names in zip(*used))
        log.warning("%s: deprecated, use %s (same meaning); the old names will be removed", old, new)


def _add_cache_job_args(parser: argparse.ArgumentParser, index_help: str, count_help: str, example: str) -> None:
    parser.add_argument("--config", help="JSON or YAML cache config (fields of CacheConfig); defaults if omitted")
    parser.add_argument("--out", help="cache directory (required)")
    parser.add_argument("--worker-index", type=int, metavar="I", help=index_help)
    parser.add_argument("--num-workers", type=int, metavar="N", help=count_help)
    parser.add_argument("--shard-index", dest="worker_index", type=int, metavar="I", action=_DeprecatedFlag,
                        new_flag="--worker-index", help="deprecated name of --worker-index")  # fmt: skip
    parser.add_argument("--num-shards", dest="num_workers", type=int, metavar="N", action=_DeprecatedFlag,
                        new_flag="--num-workers", help="deprecated name of --num-workers")  # fmt: skip
    parser.set_defaults(deprecated_flags=[])
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    add_config_args(parser, CacheConfig)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="lrc-cache", description="Run the teacher once; store its signal in a sharded cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or complete) a cache")
    _add_cache_job_args(build, "this worker's index: with --num-workers N it builds shards I, I+N, ...; alone, "
                        "shard I only (one worker per shard)", "number of parallel workers splitting the shards",
                        "topk=32 format=webdataset")  # fmt: skip
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    tokenize = sub.add_parser("tokenize", help="tokenise the corpus into the cache's index (this worker's files)")
    _add_cache_job_args(tokenize, "this worker's index (with --num-workers N: corpus units I, I+N, ...)",
                        "number of parallel tokenising workers", "corpus=/data/*.jsonl.zst")  # fmt: skip
    plan = sub.add_parser("plan", help="bytes, shards, objects and teacher FLOPs of a cache before building it "
                          "(docs/planning.md)")  # fmt: skip
    plan.add_argument("--config", help="JSON or YAML cache config (or give it as the first argument)")
    plan.add_argument("--tokens", type=_token_count, metavar="N",
                      help="training tokens, e.g. 20e9 or 20B (default: cache.max_sequences x cache.seq_len)")
    plan.add_argument("--gpu-tflops", type=float, metavar="T",
                      help="achieved TFLOP/s per GPU of the teacher forward, for GPU-hours")
    plan.add_argument("--teacher-config", metavar="PATH",
                      help="the teacher's config.json (or a folder holding it) instead of cache.teacher's")
    plan.add_argument("--ratios-from", metavar="CACHE", action="append", default=[],
                      help="compression ratios measured on this built cache (same teacher and corpus), used "
                      "before the built-in SmolLM2 ones; repeatable (the first measuring a field wins)")  # fmt: skip
    plan.add_argument("--doc-tokens", type=float, metavar="N",
                      help="mean tokens per corpus document, for the index's document starts")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. act_dtype=int4 (a first argument "
                      "without '=' is the config file)")  # fmt: skip
    add_config_args(plan, CacheConfig)
    inspect = sub.add_parser("inspect", help="sizes, compression, teacher statistics, fingerprints")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    verify = sub.add_parser("verify", help="recompute every checksum; non-zero exit on a bad or missing shard")
    clean = sub.add_parser("clean", help="remove temporary files and unrecorded shard data left by killed builds "
                           "(only while no build of this cache is running)")  # fmt: skip
    clean.add_argument("--all", action="store_true",
                       help="also remove temporaries whose writers may still run (a live pid on this host, "
                       "or written on another host within the last day); only when no build of this "
                       "cache runs")  # fmt: skip
    clean.add_argument("--derived", action="store_true",
                       help="also remove the files computed from the cache after it was built (derived/: the PCA "
                       "basis); they are recomputed when next needed")  # fmt: skip
    for command in (inspect, verify, clean):
        command.add_argument("cache", help="cache directory or URL (s3://bucket/prefix, ...)")
        command.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                             help='for a URL: fsspec options, e.g. \'{"profile": "research"}\' (no secrets)')  # fmt: skip
    return parser, sub.choices


def _cache_config(args) -> CacheConfig:
    overrides = [o[len("cache."):] if o.startswith("cache.") else o for o in args.overrides]
    return load_config(CacheConfig, args.config, overrides)


def _plan_config(args) -> CacheConfig:
    """`plan`'s config: a first argument without '=' names the config file (like --config)."""
    from ..config import ConfigError

    if args.overrides and "=" not in args.overrides[0]:
        if args.config is not None:
            raise ConfigError(f"two config files: --config {args.config} and {args.overrides[0]}; give one")
        args.config, args.overrides = args.overrides[0], args.overrides[1:]
    return _cache_config(args)


_TOKEN_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _token_count(text: str) -> int:
    """A token count: an integer, a float such as 20e9, or a number with K, M, B or T (20B)."""
    scale = _TOKEN_SUFFIXES.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count; write e.g. 20e9 or 20B") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the token count must be at least 1")
    return int(value)


def _teacher_config_json(teacher: str, path: str | None) -> tuple[dict, str]:
    """The teacher's config.json as a dict, and where it was read: `path` (a file or a folder holding one),
    else `teacher`'s: a folder's, a Hub id's in the local Hugging Face cache (config.json alone suffices, no
    weights), a built-in teacher's (loaded; they are small), or a GGUF file's."""
    from ..teacher.load import HUB_ID, TeacherLoadError, hub_cache_dir, load_teacher

    if path is not None:
        file = Path(path).expanduser()
        file = file / "config.json" if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"--teacher-config {path}: no such file (pass a config.json or its folder)")
        return _read_json(file), str(file)
    folder = Path(teacher).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise TeacherLoadError(f"teacher directory {folder} has no config.json; pass --teacher-config PATH")
        return _read_json(folder / "config.json"), str(folder / "config.json")
    hub_id = HUB_ID.fullmatch(teacher) if not folder.exists() and folder.suffix != ".gguf" else None
    if hub_id is not None:
        repo = hub_cache_dir() / ("models--" + hub_id["repo"].replace("/", "--"))
        revision = hub_id["revision"] or "main"
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        file = repo / "snapshots" / commit / "config.json"
        if not file.is_file():
            raise TeacherLoadError(f"teacher {teacher!r} has no config.json in the local Hugging Face cache "
                                   f"{hub_cache_dir()}; fetch it with `hf download {hub_id['repo']} config.json`, or "
                                   "pass --teacher-config PATH")  # fmt: skip
        return _read_json(file), str(file)
    return load_teacher(teacher).config.to_dict(), f"teacher {teacher}"


def _read_json(file: Path) -> dict:
    from ..config import ConfigError

    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file} is not JSON ({err}); pass the teacher's config.json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds no JSON object; pass the teacher's config.json")
    return data


def _bytes(n: float) -> str:
    """`n` bytes in decimal units (kB, MB, GB, TB, PB), three significant figures."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _plan(args) -> int:
    from ..cache.plan import SMOLLM2_RATIOS, geometry_from_hf_config, measure_ratios, plan_cache
    from ..config import ConfigError

    cfg = _plan_config(args)
    tokens = args.tokens
    if tokens is None:
        if cfg.max_sequences is None:
            raise ConfigError("give --tokens N (e.g. 20e9): the config sets no cache.max_sequences to plan from")
        tokens = cfg.max_sequences * cfg.seq_len
    if args.gpu_tflops is not None and not args.gpu_tflops > 0:
        raise ConfigError(f"--gpu-tflops {args.gpu_tflops} must be > 0 (the achieved TFLOP/s of one GPU)")
    hf_config, source = _teacher_config_json(cfg.teacher, args.teacher_config)
    geometry = geometry_from_hf_config(hf_config, source)
    ratios = [*(measure_ratios(cache, name=f"measured on {cache}") for cache in args.ratios_from), SMOLLM2_RATIOS]
    plan = plan_cache(cfg, geometry, tokens, ratios, args.doc_tokens)
    if args.json:
        out = plan.to_dict()
        out["teacher_config"] = source
        if args.gpu_tflops:
            out["gpu_hours"], out["gpu_tflops"] = plan.gpu_hours(args.gpu_tflops), args.gpu_tflops
        print(json.dumps(out, indent=2))
        return 0
    g, train, L = geometry, plan.train, cfg.seq_len
    print(f"plan  {args.config or 'default config'}: {plan.num_tokens:,} tokens ({train.num_sequences:,} sequences "
          f"of {L}), format {cfg.format}")  # fmt: skip
    print(f"  teacher         {source}: hidden {g.hidden_size}, {g.num_layers} layers, {g.num_heads} heads "
          f"({g.num_kv_heads} KV) x {g.head_dim}, FFN {g.intermediate_size}, vocab {g.vocab_size}")  # fmt: skip
    print(f"  {'field':<16}{'dtype':>9}{'raw B/tok':>11}{'rows kept':>11}{'ratio':>8}{'B/token':>10}{'total':>11}"
          "  ratio from")  # fmt: skip
    for f in plan.fields:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        print(f"  {f.name:<16}{f.dtype:>9}{f.raw_bytes_per_token:>11.2f}{f.kept_fraction:>11.3f}{ratio:>8}"
              f"{f.bytes_per_token:>10.2f}{_bytes(f.bytes_per_token * plan.num_tokens):>11}  {f.ratio_source}")
    print(f"  shards          {train.num_shards:,} of {train.sequences_per_shard} sequences, {train.files_per_shard} "
          f"files each (+ a completion record): {plan.bytes_per_token:.1f} B/token, {_bytes(train.data_bytes)} "
          "(what lrc-cache inspect reports)")  # fmt: skip
    if plan.heldout is not None:
        held = plan.heldout
        print(f"  held-out split  up to {held.num_sequences:,} sequences in {held.num_shards} shard(s): "
              f"{_bytes(held.data_bytes)}")  # fmt: skip
    print(f"  records         {_bytes(train.record_bytes + (plan.heldout.record_bytes if plan.heldout else 0))}; "
          "manifest ~4 kB")  # fmt: skip
    documents = (f", {plan.index_documents:,} documents" if plan.index_documents is not None else
                 " (token stream only: --doc-tokens N adds the documents' starts)")  # fmt: skip
    print(f"  index           {_bytes(plan.index_bytes)}{documents}")
    print(f"  total           {_bytes(plan.total_bytes)} in {plan.num_objects:,} objects (the index's files apart)")
    hours = (f"; {plan.gpu_hours(args.gpu_tflops):,.1f} GPU-hours at {args.gpu_tflops:g} TFLOP/s" if args.gpu_tflops
             else " (--gpu-tflops T gives GPU-hours)")  # fmt: skip
    print(f"  teacher FLOPs   {plan.flops_per_token:.3g} a token, {plan.flops:.3g} in all{hours}")
    for table in plan.ratios:
        print(f"  ratios {table.name}: {table.provenance}")
        if table.shard_format != cfg.format:
            print(f"  note: these ratios were measured on {table.shard_format} shards; {cfg.format} shards of short "
                  "sequences compress differently (docs/planning.md)")  # fmt: skip
    unmeasured = [f.name for f in plan.fields if f.ratio is None]
    if unmeasured:
        print(f"  unmeasured: {', '.join(unmeasured)} costed uncompressed (an upper bound); --ratios-from CACHE "
              "measures them on a small cache built with this config")  # fmt: skip
    return 0


def _build(args) -> int:
    from ..capture.build import build_cache
    from ..capture.tensor_parallel import tensor_parallel_layout
    from ..config import ConfigError, to_dict

    _warn_deprecated(args)
    cfg = _cache_config(args)
    check_out_dir(args.out)
    worker, num_workers = args.worker_index, args.num_workers
    if num_workers is not None and worker is None:
        raise ConfigError("--num-workers N needs --worker-index I (this worker's index in 0..N-1)")
    if cfg.run.vllm_tensor_parallel_size is not None:
        log.warning("cache.run.vllm_tensor_parallel_size: deprecated, use cache.run.tensor_parallel_size (same "
                    "meaning); the old name will be removed")  # fmt: skip
    layout = tensor_parallel_layout(cfg.run)
    if layout is not None:  # each group of ranks is one worker; the launch's own place is the array task's
        if worker is None and "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
            worker, num_workers = launcher_rank()
        worker, num_workers = layout.worker_split(worker, num_workers)
    elif worker is None:
        worker, num_workers = launcher_rank()
        if worker is not None and cfg.run.device == "auto" and "LOCAL_RANK" in os.environ:
            cfg.run.device = f"cuda:{os.environ['LOCAL_RANK']}" if _has_cuda() else "cpu"
    if layout is None or layout.leader:
        log.info("config: %s", json.dumps(to_dict(cfg)))
    report = build_cache(cfg, args.out, worker, num_workers, progress=not args.no_progress)
    if report.follower:
        log.info("tensor-parallel rank %d of group %d: ran the teacher with its group's writer (rank 0), %d tokens; "
                 "wrote nothing", layout.rank, layout.group, report.tokens)  # fmt: skip
        return 0
    log.info("built %d shard(s) and %d held-out shard(s), skipped %d and %d complete; %d tokens at %.0f tokens/s",
             len(report.built), len(report.heldout_built), len(report.skipped), len(report.heldout_skipped),
             report.tokens, report.tokens_per_s)  # fmt: skip
    return 0


def _tokenize(args) -> int:
    from ..capture.build import tokenize_corpus
    from ..teacher.load import load_tokenizer
    from ..config import ConfigError

    _warn_deprecated(args)
    cfg = _cache_config(args)
    check_out_dir(args.out)
    worker, num_workers = args.worker_index, args.num_workers
    if (worker is None) != (num_workers is None):
        raise ConfigError("--worker-index I and --num-workers N go together (this worker's index in 0..N-1)")
    if worker is None:
        worker, num_workers = launcher_rank()
    if worker is not None and num_workers is not None and not 0 <= worker < num_workers:
        raise ConfigError(f"--worker-index {worker} must be in [0, --num-workers {num_workers})")
    index = tokenize_corpus(cfg, args.out, load_tokenizer(cfg.teacher), worker, num_workers)
    log.info("index %s: %d unit(s), %d still to tokenise by other workers", index.root, len(index.units),
             len(index.missing()))  # fmt: skip
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _number(value, spec: str) -> str:
    """`value` formatted by `spec`, or '-' where there is none (no complete shard to measure)."""
    return "-" if value is None else format(value, spec)


def _inspect(args) -> int:
    from ..cache import inspect_cache
    from ..storage import redact_url

    info = inspect_cache(args.cache, args.storage_options)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"cache {redact_url(args.cache)}")
    for key in ("sequences", "tokens", "complete_shards", "total_shards", "stored_bytes", "bytes_per_token"):
        if key in info:
            print(f"  {key:<18} {_number(info[key], '')}")
    if not info.get("complete_shards"):
        print("  no complete shard (sizes and statistics need one): build the cache with lrc-cache build, or run "
              "lrc-cache verify to see why its shards do not count")  # fmt: skip
    print(f"  {'field':<16}{'dtype':>10}{'codec':>24}{'bytes/token':>14}{'ratio':>8}")
    for name, field in sorted(info.get("fields", {}).items()):
        print(f"  {name:<16}{field['dtype']:>10}{field['codec']:>24}{_number(field['bytes_per_token'], '.1f'):>14}"
              f"{_number(field['compression_ratio'], '.2f'):>8}")
    for key, value in sorted(info.get("stats", {}).items()):
        print(f"  stat  {key:<16} {value:.4g}")
    held = info.get("heldout")
    if held:
        acts = "with" if held["activations"] else "without"
        print(f"  held-out split    {held['sequences']} sequences ({held['tokens']} tokens) in shards/heldout-*: "
              f"{held['complete_shards']}/{held['total_shards']} shards complete, {held['stored_bytes']} bytes, "
              f"{acts} activations")  # fmt: skip
    else:
        print("  held-out split    none (built with heldout_docs=0, or before caches stored one): training "
              "evaluates on no held-out text, or re-reads it from the corpus")  # fmt: skip
    acts = info.get("activations")
    if acts:
        print(f"  activations in {acts['sequences']} sequences ({acts['fraction']:.0%}), "
              f"{acts['layers_per_position']} of {acts['stored_layers']} layers a position; target mean square "
              "(every layer), largest layer, at sink positions / elsewhere:")  # fmt: skip
        for term, ms in acts["mean_square"].items():
            sink, other = ms["sink"], ms["other"]
            i, j = max(range(len(sink)), key=sink.__getitem__), max(range(len(other)), key=other.__getitem__)
            print(f"    {term:<5} sink {sink[i]:>11.4g} (layer {i:>2})   other {other[j]:>11.4g} (layer {j:>2})")
    for key, value in sorted(info.get("fingerprints", {}).items()):
        print(f"  fingerprint {key:<16} {value}")
    return 0


def _verify(args) -> int:
    from ..cache import verify_cache
    from ..storage import redact_url

    report = verify_cache(args.cache, args.storage_options)
    for index, reason in sorted(report.bad.items()):
        print(f"BAD     shard {index}: {reason}")
    for index in report.missing:
        print(f"MISSING shard {index}")
    for index, reason in sorted(report.heldout_bad.items()):
        print(f"BAD     held-out shard {index}: {reason}")
    for index in report.heldout_missing:
        print(f"MISSING held-out shard {index}")
    held = ""
    if report.heldout_num_shards:
        held = f"; {len(report.heldout_complete)}/{report.heldout_num_shards} held-out shards too"
    print(f"{len(report.complete)}/{report.num_shards} shards complete and verified{held}" if report.ok else
          f"cache {redact_url(args.cache)} FAILED verification")  # fmt: skip
    return 0 if report.ok else 1


def _clean(args) -> int:
    from ..cache import clean_stale, remove_derived, temporaries
    from ..cache.records import MANIFEST_NAME
    from ..fsutil import TMP_PREFIX
    from ..storage import as_location

    root = as_location(args.cache, args.storage_options)
    # a build killed while creating its manifest leaves only temporary entries: that is still a cache
    if not root.is_file(MANIFEST_NAME) and not any(name.startswith(TMP_PREFIX) for name in root.names()):
        raise FileNotFoundError(f"{root} is not a cache (no {MANIFEST_NAME} there); nothing removed")
    print(f"removed {clean_stale(root, abandoned_only=not args.all)} leftover item(s) from {root}")
    if args.derived:
        removed = remove_derived(root)
        print(f"removed derived files {', '.join(removed)}" if removed else "no derived files to remove")
    kept = temporaries(root)
    if kept:
        print(f"kept {len(kept)} temporary item(s) a running build may own (a live pid on this host, or "
              "written on another host within the last day); with no build of this cache running, "
              "rerun with --all to remove them")  # fmt: skip
    return 0


_KEPT_ON_FULL_DISK = {"build": "complete shards are kept, and a rerun builds only the rest",
                      "tokenize": "tokenised units are kept, and a rerun tokenises only the rest"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    handlers = {"tokenize": _tokenize, "build": _build, "plan": _plan, "inspect": _inspect, "verify": _verify,
                "clean": _clean}  # fmt: skip
    return dispatch(_parser, argv, handlers, configs={"build": _cache_config, "tokenize": _cache_config,
                                                      "plan": _plan_config},
                    required={"build": ("--out",), "tokenize": ("--out",)}, kept=_KEPT_ON_FULL_DISK)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
