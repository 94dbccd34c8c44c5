"""benchmarks/memory_model.py: the activation model fitted from saved-tensor measurements predicts the
bytes saved at a geometry it was not fitted on."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_model  # noqa: E402


def test_fitted_activation_model_predicts_an_unseen_geometry():
    c = memory_model.fit()
    shape = dict(d_T=192, d_S=96, heads=6, kv=3, hd=32, f=768, V=1500, L=3, B=2, P=8)
    grown = memory_model.saved_bytes(T=128, **shape) - memory_model.saved_bytes(T=64, **shape)
    measured = grown / (shape["B"] * 64)  # bytes saved per token
    q_w, kv_w = shape["heads"] * shape["hd"], shape["kv"] * shape["hd"]
    per_layer = (c["c_dS"] * shape["d_S"] + c["c_f"] * shape["f"] + c["c_q"] * q_w + c["c_kv"] * kv_w
                 + c["c_head"] * shape["heads"] + c["c_0"])  # fmt: skip
    predicted = shape["L"] * per_layer + c["c_V"] * shape["V"] + c["c_dS_out"] * shape["d_S"] + c["c_rest"]
    assert abs(measured - predicted) < 0.01 * measured, (measured, predicted)
    gib = memory_model.memory(memory_model.RUNS[0][0], 1536, 1, 2048, c, world=8, fsdp=False)
    assert abs(gib["total"] - sum(v for k, v in gib.items() if k != "total")) < 1e-9 and 20 < gib["total"] < 60
