"""The student's attention under every instruction set ATen can dispatch to (ATEN_CPU_CAPABILITY).

The variable is read when torch starts, so each capability runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_SCRIPT = """
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from lrc_offline.student.functional import attention
torch.manual_seed(0)
q = torch.randn(2, 6, 64, 32, dtype=torch.bfloat16, requires_grad=True)
kv = torch.randn(2, 3, 64, 32, dtype=torch.bfloat16, requires_grad=True)
attention(q, kv, kv, None, 32 ** -0.5).float().square().sum().backward()
got = (q.grad.clone(), kv.grad.clone())
q.grad = kv.grad = None
with sdpa_kernel(SDPBackend.MATH):
    attention(q, kv, kv, None, 32 ** -0.5).float().square().sum().backward()
# bf16 gradients of two kernels: within a few bf16 ulps of the values' scale
for a, b in zip(got, (q.grad, kv.grad)):
    assert (a.float() - b.float()).abs().max() <= 3e-2 * b.float().abs().max(), (a - b).abs().max()
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_bf16_attention_trains_under_every_cpu_capability(capability):
    if capability == "avx512" and not torch.cpu._is_avx512_supported():
        pytest.skip("this CPU has no AVX-512")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == capability.upper()
