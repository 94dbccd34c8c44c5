"""What the entry points share: command parsing, config help, the user-error boundary, logging and
launcher environment."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_main", "user_errors", "launcher_rank", "parse_command", "dispatch", "add_config_args", "require_args",
           "print_config", "check_out_dir", "disk_full_error"]  # fmt: skip

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|PytorchStreamWriter failed writing|unexpected pos \d+ vs \d+|"
                          rf"\(os error (?:{'|'.join(map(str, _DISK_FULL_ERRNOS))})\)")
"""What writers that drop the errno say when a write comes up short: numpy's `tofile`, the zip writer of
`torch.save`, and Rust's I/O errors (safetensors). On a local disk a short write means no space (or
quota, or file-size limit) is left."""


class _HelpConfig(argparse.Action):
    """`--help-config`: print every config key and exit, like `--help` (so no other argument is needed)."""

    def __init__(self, option_strings, dest, config_cls: type, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.config_cls = config_cls

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..config_help import format_config_help

        sys.stdout.write(format_config_help(self.config_cls))
        parser.exit(0)


def json_object(text: str) -> dict:
    """argparse type of a JSON object flag (--storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


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
    kept: dict[str, str] | None = None,
) -> int:
    """An entry point's `main`: parse, then print a command's resolved config (`--print-config`, via
    `configs`) or check its `required` options and run its handler behind the user-error boundary.
    `kept` says, per command, what survives a full disk (for its one-line error)."""
    parser, commands = make_parser()
    args = parse_command(parser, commands, argv)
    if args is None:
        return 2
    if args.command in configs and args.print_config:
        return run_main(lambda: print_config(configs[args.command](args)))
    require_args(commands[args.command], args, *required.get(args.command, ()))
    return run_main(lambda: handlers[args.command](args), out=getattr(args, "out", None),
                    kept=(kept or {}).get(args.command, ""))  # fmt: skip


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


def run_main(body: Callable[[], int | None], out: str | None = None, kept: str = "") -> int:
    """Run `body`; a user error or a full disk becomes one line on stderr (credentials in URLs masked) and
    exit status 2. `out` names where the command writes and `kept` what a full disk leaves intact."""
    from ..storage import redact_url

    logging.basicConfig(level=os.environ.get("LRC_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return body() or 0
    except user_errors() as err:
        print(f"error: {redact_url(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        full = disk_full_error(err)
        if full is None:
            raise
        where = getattr(full, "filename", None) or (f"under {out}" if out else "the output")
        known = isinstance(full, OSError) and full.errno in _DISK_FULL_ERRNOS
        code = f"{errno.errorcode[full.errno]}: {full.strerror}" if known else _one_line(full)
        fix = "free space (or raise the quota or file-size limit) and rerun" + (f"; {kept}" if kept else "")
        print(f"error: no space left writing {redact_url(str(where))} ({type(full).__name__} {code}): {fix}",
              file=sys.stderr)  # fmt: skip
        return 2


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def disk_full_error(err: BaseException | None) -> BaseException | None:
    """The error in `err`'s chain (itself, its cause or context, ...) saying a write found no space left: the
    disk or a quota full, or a file past the file-size limit. None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return err
        if _SHORT_WRITE.search(str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


def check_out_dir(out: str | None, flag: str = "--out") -> None:
    """Refuse, before anything loads or is written, a local output directory that is an existing file or lies
    under one (a URL is left to its filesystem)."""
    from ..storage import is_url

    if out is None or is_url(out):
        return
    path = Path(out).expanduser()
    for existing in (path, *path.parents):
        if existing.is_dir():
            return
        if existing.exists():
            what = "is a file" if existing == path else f"lies under {existing}, which is a file"
            raise FileExistsError(f"{flag} {out} {what}, not a directory; pass a new or existing directory")


def launcher_rank() -> tuple[int | None, int | None]:
    """(worker index, worker count) from a Slurm array or a torchrun/accelerate launch, else (None, None)."""
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None, None
