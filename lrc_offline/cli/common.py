"""What both entry points share: the user-error boundary, logging and launcher environment."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

__all__ = ["run_main", "user_errors", "launcher_rank"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: reported in one line, exit status 2, no traceback."""
    from ..cache import CacheFormatError, CacheMismatchError
    from ..capture.corpus import CorpusError
    from ..config import ConfigError
    from ..teacher.adapters import UnsupportedArchitectureError
    from ..teacher.load import TeacherLoadError
    from ..training.checkpoint import CheckpointError
    from ..training.reader import ReaderStateError
    from ..training.trainer import TeacherMismatchError

    return (ConfigError, CorpusError, TeacherLoadError, UnsupportedArchitectureError, CacheFormatError,
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
