"""What the entry points share: command parsing, config help, the user-error boundary, logging and
launcher environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

__all__ = ["run_main", "user_errors", "launcher_rank", "parse_command", "dispatch", "add_config_args", "require_args",
           "print_config"]  # fmt: skip


class _HelpConfig(argparse.Action):
    """`--help-config`: print every config key and exit, like `--help` (so no other argument is needed)."""

    def __init__(self, option_strings, dest, config_cls: type, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.config_cls = config_cls

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..config_help import format_config_help

        sys.stdout.write(format_config_help(self.config_cls))
        parser.exit(0)


def add_config_args(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """`--help-config` and `--print-config` for a command whose config is `config_cls`."""
    parser.add_argument("--help-config", action=_HelpConfig, config_cls=config_cls,
                        help="list every config key with its type, default and meaning, and exit")  # fmt: skip
    parser.add_argument("--print-config", action="store_true",
                        help="print the config this command would run (after --config and overrides) as YAML that "
                        "--config reads back, and exit without writing anything")  # fmt: skip


def print_config(config: Any) -> int:
    from ..config import config_yaml

    sys.stdout.write(config_yaml(config))
    return 0


def parse_command(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser],
                  argv: list[str] | None) -> argparse.Namespace | None:  # fmt: skip
    """Parse `PROG COMMAND ARGS`, where a command's options and its key=value overrides may come in any order.

    argparse cannot intermix the arguments of a subcommand, so the first argument picks the command's own
    parser, which reads the rest with `parse_intermixed_args`. Returns None, after a one-line error on
    stderr, when the first argument names no command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        parser.parse_args(argv[:1])  # prints the help and exits
    if not argv or argv[0] not in commands:
        if not argv:
            got = "no command given"
        elif argv[0].startswith("-"):
            got = f"{argv[0]} comes before the command (e.g. {parser.prog} {next(iter(commands))} {argv[0]} ...)"
        else:
            got = f"unknown command {argv[0]!r}"
        print(f"{parser.prog}: error: {got}; the command is one of {', '.join(commands)}", file=sys.stderr)
        return None
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def dispatch(
    make_parser: Callable[[], tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]],
    argv: list[str] | None,
    handlers: dict[str, Callable[[argparse.Namespace], int]],
    configs: dict[str, Callable[[argparse.Namespace], Any]],
    required: dict[str, tuple[str, ...]],
) -> int:
    """An entry point's `main`: parse, then print a command's resolved config (`--print-config`, via
    `configs`) or check its `required` options and run its handler behind the user-error boundary."""
    parser, commands = make_parser()
    args = parse_command(parser, commands, argv)
    if args is None:
        return 2
    if args.command in configs and args.print_config:
        return run_main(lambda: print_config(configs[args.command](args)))
    require_args(commands[args.command], args, *required.get(args.command, ()))
    return run_main(lambda: handlers[args.command](args))


def require_args(parser: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """argparse's own error (exit 2) for missing options that only --print-config may leave out."""
    missing = [flag for flag in flags if getattr(args, flag.lstrip("-").replace("-", "_")) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: reported in one line, exit status 2, no traceback."""
    from ..cache import CacheFormatError, CacheMismatchError
    from ..data import CorpusError
    from ..config import ConfigError
    from ..teacher.adapters import UnsupportedArchitectureError
    from ..teacher.load import TeacherLoadError
    from ..training.checkpoint import CheckpointError
    from ..training.reader import ReaderStateError
    from ..training.trainer import TeacherMismatchError
    from ..storage import StorageError

    return (StorageError, FileExistsError, ConfigError, CorpusError, TeacherLoadError, UnsupportedArchitectureError, CacheFormatError,
            CacheMismatchError, CheckpointError, ReaderStateError, TeacherMismatchError, FileNotFoundError,
            PermissionError)  # fmt: skip


def run_main(body: Callable[[], int | None]) -> int:
    logging.basicConfig(level=os.environ.get("LRC_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return body() or 0
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def launcher_rank() -> tuple[int | None, int | None]:
    """(worker index, worker count) from a Slurm array or a torchrun/accelerate launch, else (None, None)."""
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None, None
