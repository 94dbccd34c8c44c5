#!/usr/bin/env bash
# The main job end to end on the real default: SmolLM2-135M (packaged GGUF) distilled on the packaged
# Wikipedia text. Builds the teacher cache once, trains a 288-wide LRC student from it (the teacher's
# forward never runs again), exports it, evaluates it against the teacher on held-out paragraphs, samples
# from it with plain transformers, and writes summary.json and loss_curve.png to runs/demo/.
# Safe to rerun: a complete cache is reused and training resumes from its latest checkpoint.
#   ./demo.sh [OUT_DIR] [--preset tiny]
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
out=${1:-runs/demo}
shift || true
exec .venv/bin/python -m lrc_offline.cli.demo --out "$out" "$@"
