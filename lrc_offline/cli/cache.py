"""`lrc-cache`: build, inspect and verify a teacher cache.

    lrc-cache tokenize --config FILE --out DIR [--worker-index I --num-workers N] [key=value ...]
    lrc-cache build --config FILE --out DIR [--worker-index I [--num-workers N]] [key=value ...]
    lrc-cache build --help-config | [--config FILE] [key=value ...] --print-config
    lrc-cache inspect DIR [--json]
    lrc-cache verify DIR
    lrc-cache clean DIR [--all] [--derived]   (after a killed build: remove its leftovers; never during a build)

Worker I of N tokenises corpus units I, I+N, ... and builds shards I, I+N, ...; under a Slurm array or
torchrun/accelerate the split comes from the launcher. --shard-index/--num-shards are deprecated names of
--worker-index/--num-workers.

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
from .common import add_config_args, check_out_dir, dispatch, launcher_rank

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
        command.add_argument("--storage-options", type=_json_object, default={}, metavar="JSON",
                             help='for a URL: fsspec options, e.g. \'{"profile": "research"}\' (no secrets)')  # fmt: skip
    return parser, sub.choices


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _cache_config(args) -> CacheConfig:
    overrides = [o[len("cache."):] if o.startswith("cache.") else o for o in args.overrides]
    return load_config(CacheConfig, args.config, overrides)


def _build(args) -> int:
    from ..capture.build import build_cache
    from ..config import ConfigError, to_dict

    _warn_deprecated(args)
    cfg = _cache_config(args)
    check_out_dir(args.out)
    worker, num_workers = args.worker_index, args.num_workers
    if num_workers is not None and worker is None:
        raise ConfigError("--num-workers N needs --worker-index I (this worker's index in 0..N-1)")
    if worker is None:
        worker, num_workers = launcher_rank()
        if worker is not None and cfg.run.device == "auto" and "LOCAL_RANK" in os.environ:
            cfg.run.device = f"cuda:{os.environ['LOCAL_RANK']}" if _has_cuda() else "cpu"
    log.info("config: %s", json.dumps(to_dict(cfg)))
    report = build_cache(cfg, args.out, worker, num_workers, progress=not args.no_progress)
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
    handlers = {"tokenize": _tokenize, "build": _build, "inspect": _inspect, "verify": _verify, "clean": _clean}
    return dispatch(_parser, argv, handlers, configs={"build": _cache_config, "tokenize": _cache_config},
                    required={"build": ("--out",), "tokenize": ("--out",)}, kept=_KEPT_ON_FULL_DISK)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
