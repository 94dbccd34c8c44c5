"""GPU memory per process for a training step, computed for production geometries (docs/scaling.md).

Activation memory is not guessed: the bytes autograd saves for the backward of one LRC step (bf16
autocast, as on a GPU) are measured on this implementation at small geometries, by a saved-tensors hook,
and fitted exactly by a linear model in the widths; that model is then evaluated at the production
shapes. Weights, gradients and Adam moments are counted from the shapes.

    python benchmarks/memory_model.py                 # measure the coefficients, print the table
    python benchmarks/memory_model.py --json out.json

Legend: d_T teacher hidden, d_S student hidden, L layers, q_w = heads x head_dim, kv_w = kv heads x
head_dim, f FFN width, V vocabulary.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

import torch
import transformers

from lrc_offline.batch import Batch, CloneActivations, TopKSignal
from lrc_offline.config import LossConfig, TrainConfig
from lrc_offline.student.lrc import LRCStudent
from lrc_offline.training.objective import lrc_loss

GIB = 2**30
CHUNK_TOKENS = TrainConfig().loss_chunk_tokens
"""The fused head + loss's chunk (`train.loss_chunk_tokens`), as a run uses it."""


@dataclass(frozen=True)
class Geometry:
    name: str
    d_T: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def q_w(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_w(self) -> int:
        return self.kv_heads * self.head_dim

    def teacher_params(self) -> int:
        per_layer = self.d_T * (2 * self.q_w + 2 * self.kv_w) + 3 * self.d_T * self.ffn + 2 * self.d_T
        return self.layers * per_layer + self.vocab * self.d_T * (1 if self.tied else 2) + self.d_T


RUNS = [  # (teacher, d_S, micro-batch sequences in train/*.yaml, tokens per sequence)
    (Geometry("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True), 1536, 8, 2048),
    (Geometry("Qwen2.5-7B", 3584, 28, 28, 4, 128, 18944, 152064, False), 2048, 8, 2048),
    (Geometry("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256, False), 4096, 8, 2048),
]


def saved_bytes(d_T=256, d_S=128, heads=4, kv=2, hd=64, f=512, V=1000, L=2, B=2, T=128, P=8) -> int:
    """Bytes autograd saves for the backward of one `lrc_loss` (top-8 KD + CE + clone loss from residuals
    at P positions, bf16 autocast, the fused head + loss in chunks of CHUNK_TOKENS), not counting the
    student's parameters and the teacher's buffers."""
    cfg = transformers.LlamaConfig(hidden_size=d_T, intermediate_size=f, num_attention_heads=heads,
                                   num_key_value_heads=kv, head_dim=hd, vocab_size=V, num_hidden_layers=L,
                                   tie_word_embeddings=False, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()  # bf16, as loaded on a GPU
    student = LRCStudent(teacher, d_S, untie_head=True)
    resident = {t.data_ptr() for t in list(student.parameters()) + list(student.buffers())}
    positions = torch.stack([torch.randperm(T)[:P] for _ in range(B)])
    acts = {"input": torch.randn(B, L, P, d_T), "attn": torch.randn(B, L, P, d_T)}
    signal = TopKSignal(torch.randint(0, V, (B, T, 8)), torch.full((B, T, 8), -3.0))
    batch = Batch(torch.randint(0, V, (B, T)), signal=signal, clone=CloneActivations.build(positions, acts))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in resident:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        lrc_loss(student, batch, LossConfig(), chunk_tokens=CHUNK_TOKENS)
    return sum(seen.values())


def per_token(**shape) -> tuple[float, float]:
    """(bytes per token per layer, bytes per token outside the layers) at `shape`: slopes in tokens at
    two layer counts."""
    a = saved_bytes(T=256, L=4, **shape) - saved_bytes(T=128, L=4, **shape)
    b = saved_bytes(T=256, L=2, **shape) - saved_bytes(T=128, L=2, **shape)
    tokens = 2 * 128
    layer = (a - b) / (2 * tokens)
    return layer, (b - 2 * tokens * layer) / tokens


def fit() -> dict[str, float]:
    """Coefficients of bytes per token per layer = c_dS d_S + c_f f + c_q q_w + c_kv kv_w + c_h heads + c_0,
    and outside the layers = c_V V + c_dS_out d_S + rest, from one-at-a-time width changes."""
    base = dict(d_S=128, f=512, heads=4, kv=2)
    layer0, out0 = per_token(**base)
    d_s = (per_token(**{**base, "d_S": 256})[0] - layer0) / 128
    d_f = (per_token(**{**base, "f": 1024})[0] - layer0) / 512
    d_kv = (per_token(**{**base, "kv": 4})[0] - layer0) / 128  # kv heads 2 -> 4 at head_dim 64
    heads = per_token(**{**base, "heads": 8})[0] - layer0  # q_w 256 -> 512 and 4 more heads
    d_q = round(heads / 256)
    d_h = (heads - d_q * 256) / 4
    const = layer0 - (d_s * 128 + d_f * 512 + d_q * 256 + d_kv * 128 + d_h * 4)
    d_v = (per_token(**{**base, "V": 2000})[1] - out0) / 1000
    d_s_out = (per_token(**{**base, "d_S": 256})[1] - out0) / 128
    rest = out0 - d_v * 1000 - d_s_out * 128
    return {"c_dS": d_s, "c_f": d_f, "c_q": d_q, "c_kv": d_kv, "c_head": d_h, "c_0": const, "c_V": d_v,
            "c_dS_out": d_s_out, "c_rest": rest}  # fmt: skip


def memory(geo: Geometry, d_S: int, batch: int, seq: int, c: dict[str, float], world: int, fsdp: bool,
           checkpointing: bool = False) -> dict:  # fmt: skip
    """GiB per process under DDP (everything replicated) or FSDP2 over `world` processes (teacher weights,
    projections, gradients and Adam moments sharded per layer; one layer gathered at a time), with
    `checkpointing` (train.activation_checkpointing, FSDP2 only here) each layer keeping only its bf16
    input and recomputing its weights and activations in the backward, one layer at a time."""
    trainable = geo.layers * (7 * geo.d_T * d_S + 2 * d_S) + 2 * geo.d_T * d_S + d_S  # untied head (PCA start)
    teacher = 2 * geo.teacher_params()  # bf16
    states = 16 * trainable  # fp32 weights, gradients, two Adam moments
    tokens = batch * seq
    per_layer_token = (c["c_dS"] * d_S + c["c_f"] * geo.ffn + c["c_q"] * geo.q_w + c["c_kv"] * geo.kv_w
                       + c["c_head"] * geo.heads + c["c_0"])  # fmt: skip
    acts = tokens * geo.layers * per_layer_token
    # the fused head + loss: per token what autograd saves (the hidden state's gradient, made in the
    # forward), plus the head's gradient [V, d_S] in fp32 and, while it runs, ~3 fp32 [chunk, V] buffers
    chunk = min(CHUNK_TOKENS, tokens) if CHUNK_TOKENS else tokens
    logits = tokens * (c["c_V"] * geo.vocab + c["c_dS_out"] * d_S + c["c_rest"]) + 4 * geo.vocab * d_S + 12 * chunk * geo.vocab
    # W^S of every layer and the head (bf16), generated once per optimizer step and kept for the step,
    # with its gradient summed over the micro-batches in fp32 (`train.generate_once`): 6 bytes a weight
    generated_weights = geo.layers * d_S * (2 * geo.q_w + 2 * geo.kv_w + 3 * geo.ffn) + 2 * geo.vocab * d_S
    generated = 6 * generated_weights
    if fsdp:
        layer_teacher = 2 * (geo.d_T * (2 * geo.q_w + 2 * geo.kv_w) + 3 * geo.d_T * geo.ffn)
        gathered = layer_teacher + 4 * 7 * geo.d_T * d_S  # one layer's teacher weights and projections
        teacher, states = teacher / world + gathered, states / world
        # Each layer generates its W^S under its all-gather, per micro-batch (no generate_once); what
        # autograd keeps of it for the backward is W^S and the bf16 copy of P (2 + 2 bytes).
        generated = 2 * generated_weights + 2 * (trainable - geo.layers * 2 * d_S - d_S)
        if checkpointing:  # one layer's worth at a time, beside the embedding's and the head's
            head_weights = 2 * geo.vocab * d_S
            layer_weights = (generated_weights - head_weights) / geo.layers
            generated = 2 * (head_weights + layer_weights) + 2 * 7 * geo.d_T * d_S
            acts = tokens * (geo.layers * 2 * d_S + per_layer_token)
    parts = {"teacher_weights": teacher, "trainable_states": states, "generated_weights": generated,
             "activations": acts, "logits": logits}  # fmt: skip
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="processes for the FSDP2 rows")
    parser.add_argument("--micro-batches", default="8,1", help="micro-batch sizes (sequences) to tabulate")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    coefficients = fit()
    print("bytes saved for backward per token: per layer", " + ".join(f"{v:g} {k[2:]}" for k, v in coefficients.items()
          if k not in ("c_V", "c_dS_out", "c_rest")), "; outside the layers",
          f"{coefficients['c_V']:g} V + {coefficients['c_dS_out']:g} d_S + {coefficients['c_rest']:.0f}")  # fmt: skip
    rows = []
    header = f"{'teacher -> d_S':<24}{'micro-batch':>12}{'mode':>14}" + "".join(
        f"{k:>18}" for k in ("teacher_weights", "trainable_states", "generated_weights", "activations", "logits", "total"))
    print(header)
    modes = ((False, False), (True, False), (True, True))  # (fsdp, activation checkpointing)
    for (geo, d_S, _, seq), batch, (fsdp, ckpt) in itertools.product(RUNS, map(int, args.micro_batches.split(",")), modes):
        gib = memory(geo, d_S, batch, seq, coefficients, args.world, fsdp, ckpt)
        mode = (f"FSDP2/{args.world}" if fsdp else "DDP") + ("+ckpt" if ckpt else "")
        rows.append({"teacher": geo.name, "d_S": d_S, "batch": batch, "seq_len": seq, "mode": mode, **gib})
        print(f"{geo.name + ' -> ' + str(d_S):<24}{f'{batch}x{seq}':>12}{mode:>14}"
              + "".join(f"{gib[k]:>18.1f}" for k in ("teacher_weights", "trainable_states", "generated_weights",
                                                      "activations", "logits", "total")))  # fmt: skip
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"coefficients": coefficients, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
