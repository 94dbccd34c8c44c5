"""`lrc-train`: train LRC students.

    lrc-train online --config FILE --out DIR [section.key=value ...]   the online reference (teacher in the step)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .common import run_main

__all__ = ["main"]

log = logging.getLogger("lrc-train")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrc-train", description="Train Low-Rank Clone students.")
    sub = parser.add_subparsers(dest="command", required=True)
    online = sub.add_parser("online", help="online reference trainer: the teacher runs in every step")
    online.add_argument("--config", help="JSON or YAML TrainJobConfig; defaults if omitted")
    online.add_argument("--out", required=True, help="run directory (metrics, export, summary)")
    online.add_argument("--no-progress", action="store_true", help="no progress bar")
    online.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.hidden_size=32 train.steps=50")
    return parser


def _online(args) -> int:
    from ..config import TrainJobConfig, load_config, to_dict
    from ..online import train_online

    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    log.info("config: %s", json.dumps(to_dict(cfg)))
    summary = train_online(cfg, args.out, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"online": _online}[args.command]
    return run_main(lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
