"""The main job end to end, in one process: cache -> train from the cache -> export -> evaluate -> sample.

    python -m lrc_offline.cli.demo --out runs/demo                   # SmolLM2-135M on wiki-en (default)
    python -m lrc_offline.cli.demo --out runs/tiny --preset tiny     # the tiny random teacher, seconds

Safe to rerun: a complete cache is reused (only missing shards are built) and training resumes from
its latest checkpoint. Writes `summary.json` and `loss_curve.png` into the output folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import CacheConfig, TrainJobConfig, load_config
from ..demo import PRESETS, run_demo

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrc_offline.cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                        help="smollm2: SmolLM2-135M on wiki-en; tiny: the tiny random teacher (seconds)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cache_file, train_file = PRESETS[args.preset]
    result = run_demo(Path(args.out), load_config(CacheConfig, cache_file), load_config(TrainJobConfig, train_file),
                      progress=not args.no_progress)  # fmt: skip
    keys = ("student_heldout_ppl", "teacher_heldout_ppl")
    print("\nsummary: " + ", ".join(f"{k} {result[k]:.2f}" for k in keys)
          + f", cache {result['cache']['bytes'] / 2**20:.1f} MiB ({result['cache']['bytes_per_token']:.0f} B/token;"
          + f" bf16 at every layer would take {result['cache']['bf16_every_layer']['bytes_per_token']:.0f},"
          + " lrc-cache plan)"
          + f", training {result['train']['tokens_per_s'] or 0:.0f} tokens/s"
          + f", total {result['timings_s']['total'] / 60:.1f} min; details in {args.out}/summary.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
