"""Plan a training run before it starts: memory per GPU and per host, FLOPs per optimizer step and
tokens/s, for a `TrainJobConfig`, a teacher's geometry and a number of GPUs (`lrc-train plan`,
docs/scaling.md).

Activation memory is not guessed: the bytes autograd saves for the backward of one `lrc_loss` step are
measured on this implementation at small geometries (a saved-tensors hook) and fitted exactly by a linear
model in the widths (`fit_activations`), which is then evaluated at the planned shapes. Weights,
gradients and Adam moments are counted from the shapes; FLOPs are the matrix products of the step, as
`torch.utils.flop_counter.FlopCounterMode` counts them (benchmarks/speed_train.py measures the same).

Legend: d_T teacher hidden, d_S student hidden, L layers, q_w = heads x head_dim, kv_w = kv heads x
head_dim, f FFN width, V vocabulary; B micro-batch sequences, T tokens per sequence, P clone positions.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batch import Batch, CloneActivations, TopKSignal
from ..config import ConfigError, LossConfig, TrainConfig, TrainJobConfig
from ..student.lrc import LRCStudent
from .objective import lrc_loss

__all__ = ["Geometry", "teacher_geometry", "fit_activations", "saved_bytes", "memory", "host_memory", "step_flops",
           "plan", "format_plan", "GIB"]  # fmt: skip

GIB = 2**30
ADAM_STATE_BYTES = 16
"""fp32 weight, gradient and two AdamW moments per trainable parameter."""


@dataclass(frozen=True)
class Geometry:
    """The teacher shapes the plan needs (the student keeps all but the hidden size)."""

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

    @property
    def layer_matrix_width(self) -> int:
        """Sum of the widths of a layer's seven matrices on their non-hidden side: a layer's teacher
        matrices hold d_T x this many weights, its student matrices d_S x this many."""
        return 2 * self.q_w + 2 * self.kv_w + 3 * self.ffn

    def teacher_params(self) -> int:
        per_layer = self.d_T * self.layer_matrix_width + 2 * self.d_T
        return self.layers * per_layer + self.vocab * self.d_T * (1 if self.tied else 2) + self.d_T

    @classmethod
    def from_config(cls, name: str, config) -> "Geometry":
        """From a `transformers` config (or its config.json as a dict)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        try:
            d_T, heads = get("hidden_size"), get("num_attention_heads")
            return cls(name, d_T, get("num_hidden_layers"), heads, get("num_key_value_heads") or heads,
                       get("head_dim") or d_T // heads, get("intermediate_size"), get("vocab_size"),
                       bool(get("tie_word_embeddings", False)))  # fmt: skip
        except TypeError as err:  # a missing key: None in arithmetic
            raise ConfigError(f"teacher config of {name} lacks a field the plan needs (hidden_size, "
                              f"num_hidden_layers, num_attention_heads, intermediate_size, vocab_size): {err}") from err


def teacher_geometry(name: str | None, config_path: str | Path | None = None) -> Geometry:
    """The geometry of teacher `name` from its config only (no weights are read): `config_path` (a
    config.json) if given, else a directory's config.json, a Hub id's config.json in the local Hugging
    Face cache, or a built-in name (tiny-random:<family>, smollm2-135m)."""
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--teacher-config {path} does not exist; pass a teacher's config.json")
        config = json.loads(path.read_text())
        return Geometry.from_config(name or config.get("_name_or_path") or str(path), config)
    if not name:
        raise ConfigError("no teacher to plan for: set teacher=<name> (a directory, Hub id or built-in name) or "
                          "pass --teacher-config config.json")  # fmt: skip
    from ..teacher import load as teacher_load
    from ..teacher.tiny import TINY_FAMILIES, tiny_config

    if name.startswith("tiny-random:") and name.split(":", 1)[1] in TINY_FAMILIES:
        return Geometry.from_config(name, tiny_config(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if name == "smollm2-135m":
        path = teacher_load._smollm2_dir()
    if (path / "config.json").is_file():
        return Geometry.from_config(name, json.loads((path / "config.json").read_text()))
    if (hub_id := teacher_load.HUB_ID.fullmatch(name)) is not None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id["repo"], "config.json", revision=hub_id["revision"],
                                       cache_dir=teacher_load.hub_cache_dir())  # fmt: skip
        if isinstance(found, str):
            return Geometry.from_config(name, json.loads(Path(found).read_text()))
    raise teacher_load.TeacherLoadError(
        f"no config.json for teacher {name!r} (not a directory, a Hub id in the local Hugging Face cache nor a "
        "built-in name); pass --teacher-config PATH/config.json")  # fmt: skip


# ---- activations: measured -----------------------------------------------------------------------


def saved_bytes(d_T=256, d_S=128, heads=4, kv=2, hd=64, f=512, V=1000, L=2, B=2, T=128, P=8, bf16=True,
                chunk_tokens: int = TrainConfig.loss_chunk_tokens) -> int:  # fmt: skip
    """Bytes autograd saves for the backward of one `lrc_loss` (top-8 KD + CE + clone loss from residuals
    at P positions, the fused head + loss in chunks of `chunk_tokens`; bf16 autocast with a bf16 teacher,
    as on a GPU, or fp32, as on a CPU), not counting the student's parameters and the teacher's buffers."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=d_T, intermediate_size=f, num_attention_heads=heads,
                                   num_key_value_heads=kv, head_dim=hd, vocab_size=V, num_hidden_layers=L,
                                   tie_word_embeddings=False, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16 if bf16 else torch.float32).eval()
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

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        lrc_loss(student, batch, LossConfig(), chunk_tokens=chunk_tokens)
    return sum(seen.values())


def _per_token(bf16: bool, **shape) -> tuple[float, float]:
    """(bytes per token per layer, bytes per token outside the layers) at `shape`: slopes in tokens at
    two layer counts."""
    a = saved_bytes(T=256, L=4, bf16=bf16, **shape) - saved_bytes(T=128, L=4, bf16=bf16, **shape)
    b = saved_bytes(T=256, L=2, bf16=bf16, **shape) - saved_bytes(T=128, L=2, bf16=bf16, **shape)
    tokens = 2 * 128
    layer = (a - b) / (2 * tokens)
    return layer, (b - 2 * tokens * layer) / tokens


@functools.cache
def fit_activations(bf16: bool = True) -> dict[str, float]:
    """Coefficients of bytes per token per layer = c_dS d_S + c_f f + c_q q_w + c_kv kv_w + c_head heads +
    c_0, and outside the layers = c_V V + c_dS_out d_S + c_rest, from one-at-a-time width changes
    (measured: ~7 s on a CPU, once per process and precision)."""
    base = dict(d_S=128, f=512, heads=4, kv=2)
    layer0, out0 = _per_token(bf16, **base)
    d_s = (_per_token(bf16, **{**base, "d_S": 256})[0] - layer0) / 128
    d_f = (_per_token(bf16, **{**base, "f": 1024})[0] - layer0) / 512
    d_kv = (_per_token(bf16, **{**base, "kv": 4})[0] - layer0) / 128  # kv heads 2 -> 4 at head_dim 64
    heads = _per_token(bf16, **{**base, "heads": 8})[0] - layer0  # q_w 256 -> 512 and 4 more heads
    d_q = round(heads / 256)
    d_h = (heads - d_q * 256) / 4
    const = layer0 - (d_s * 128 + d_f * 512 + d_q * 256 + d_kv * 128 + d_h * 4)
    d_v = (_per_token(bf16, **{**base, "V": 2000})[1] - out0) / 1000
    d_s_out = (_per_token(bf16, **{**base, "d_S": 256})[1] - out0) / 128
    rest = out0 - d_v * 1000 - d_s_out * 128
    return {"c_dS": d_s, "c_f": d_f, "c_q": d_q, "c_kv": d_kv, "c_head": d_h, "c_0": const, "c_V": d_v,
            "c_dS_out": d_s_out, "c_rest": rest}  # fmt: skip


def layer_activation_bytes(geo: Geometry, d_S: int, c: dict[str, float]) -> float:
    """Bytes autograd saves per token in one decoder layer (the fitted model `c`)."""
    return (c["c_dS"] * d_S + c["c_f"] * geo.ffn + c["c_q"] * geo.q_w + c["c_kv"] * geo.kv_w
            + c["c_head"] * geo.heads + c["c_0"])  # fmt: skip


# ---- memory: counted ------------------------------------------------------------------------------


def trainable_params(geo: Geometry, d_S: int, untied: bool = True) -> int:
    """Seven projections and two norms per layer, P_e, the final norm and (untied head) P_lm."""
    return geo.layers * (7 * geo.d_T * d_S + 2 * d_S) + (2 if untied else 1) * geo.d_T * d_S + d_S


def memory(geo: Geometry, d_S: int, batch: int, seq: int, c: dict[str, float], world: int, fsdp: bool,
           checkpointing: bool = False, grad_accum: int = 2, generate_once: bool = True, bf16: bool = True,
           chunk_tokens: int = TrainConfig.loss_chunk_tokens, untied: bool = True) -> dict[str, float]:  # fmt: skip
    """GiB one process holds on its device for one optimizer step, by part, and their total.

    DDP: everything replicated, plus DDP's gradient buckets (an fp32 copy of the gradients) over more than
    one process. FSDP2 over `world` processes: teacher weights, projections, gradients and Adam moments
    sharded per layer, one layer gathered at a time. `checkpointing` (train.activation_checkpointing):
    each layer keeps only its input and recomputes its weights and activations in the backward, one
    layer at a time (the total is then the peak, below the sum of the parts: see `overlap`). `bf16`: bf16 autocast with a bf16 teacher (a GPU) or fp32 throughout (a CPU). `c`:
    `fit_activations(bf16)`."""
    compute = 2 if bf16 else 4  # bytes of a teacher weight, a generated weight, a layer input
    copy_of_p = 2 if bf16 else 0  # autocast's bf16 copy of each projection, kept for the backward
    trainable = trainable_params(geo, d_S, untied)
    projections = trainable - geo.layers * 2 * d_S - d_S
    teacher = compute * geo.teacher_params()
    states = ADAM_STATE_BYTES * trainable + (4 * trainable if world > 1 and not fsdp else 0)
    tokens = batch * seq
    per_layer_token = layer_activation_bytes(geo, d_S, c)
    acts = tokens * geo.layers * per_layer_token
    if checkpointing:  # every layer's input, one layer's activations at a time
        acts = tokens * (geo.layers * compute * d_S + per_layer_token)
    # the fused head + loss: per token what autograd saves (the hidden state's gradient, made in the
    # forward), plus the head's gradient [V, d_S] in fp32 and, while it runs, ~3 fp32 [chunk, V] buffers
    chunk = min(chunk_tokens, tokens) if chunk_tokens else tokens
    head_buffers = 12 * chunk * geo.vocab
    logits = tokens * (c["c_V"] * geo.vocab + c["c_dS_out"] * d_S + c["c_rest"]) + 4 * geo.vocab * d_S + head_buffers
    head_weights = 2 * geo.vocab * d_S
    generated_weights = geo.layers * d_S * geo.layer_matrix_width + head_weights
    if generate_once and grad_accum > 1 and not fsdp:
        # W^S of every layer and the head, generated once per optimizer step and kept for the step, with
        # its gradient summed over the micro-batches in fp32 (`train.generate_once`)
        generated = (compute + 4) * generated_weights
    elif checkpointing:  # one layer's W^S and P copy at a time, beside the embedding's and the head's
        layer_weights = (generated_weights - head_weights) / geo.layers
        generated = compute * (head_weights + layer_weights) + copy_of_p * 7 * geo.d_T * d_S
    else:  # each layer generates its W^S in the forward; autograd keeps W^S and the copy of P
        generated = compute * generated_weights + copy_of_p * projections
    if fsdp:
        layer_teacher = compute * geo.d_T * geo.layer_matrix_width
        # the largest unit all-gathered at a time: one layer's teacher weights and projections, or the
        # embedding (vocab x d_T, gathered whole for E^S = E^T P_e and for the head's weights)
        gathered = max(layer_teacher, compute * geo.vocab * geo.d_T) + 4 * 7 * geo.d_T * d_S
        teacher, states = teacher / world + gathered, states / world
    parts = {"teacher_weights": teacher, "trainable_states": states, "generated_weights": generated,
             "activations": acts, "logits": logits}  # fmt: skip
    # With checkpointing a layer's activations exist only while the backward recomputes it, after the
    # head's chunk buffers (made in the forward) are gone: the peak holds the larger of the two.
    overlap = min(head_buffers, tokens * per_layer_token) if checkpointing else 0
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values()) - overlap / GIB
    return out


def host_memory(geo: Geometry, processes_per_host: int, bf16: bool = True, world: int = 1,
                fsdp: bool = False) -> dict[str, float]:  # fmt: skip
    """GiB of host memory per host, by part: `teacher_load`, the teacher's weights read into host memory
    (bf16 on a GPU machine): under ddp each process loads the whole teacher before moving it to its GPU;
    under fsdp2 each of the `world` processes reads only its own shard of a safetensors teacher
    (`teacher/slices.py`), so a host holds processes_per_host / world of the teacher. The reader's
    prefetched shards come on top."""
    share = 1 / world if fsdp else 1.0
    teacher = (2 if bf16 else 4) * geo.teacher_params() * processes_per_host * share
    return {"teacher_load": teacher / GIB, "total": teacher / GIB}


# ---- FLOPs: counted -------------------------------------------------------------------------------


def step_flops(geo: Geometry, d_S: int, batch: int, seq: int, grad_accum: int, positions: int, fsdp: bool,
               checkpointing: bool = False, generate_once: bool = True, clone: bool = True,
               attention: bool = True) -> float:  # fmt: skip
    """Floating-point operations of one optimizer step of one process, as FlopCounterMode counts them
    (2 per multiply-add of every matrix product, attention at full T x T): the weight generation
    W^S = W^T P (forward, and its backward into P only), the student's forward and backward over
    `batch` x `seq` tokens per micro-batch, the head and, with `clone`, the teacher's targets recomputed
    from the residuals at `positions` per sequence; `checkpointing` recomputes each layer's forward
    (its weights included) in the backward. `attention`: count the attention products too (FlopCounterMode
    counts CUDA's fused attention kernels, not the CPU's, where a step's count is the rest)."""
    tokens = batch * seq
    gen_layer = 2 * geo.d_T * d_S * geo.layer_matrix_width  # one layer's W^S = W^T P
    gen_head = 2 * geo.vocab * geo.d_T * d_S  # W^T_lm P_lm, or E^T P_e for a tied head
    layer_fwd = 2 * tokens * d_S * geo.layer_matrix_width + (4 * batch * seq * seq * geo.q_w if attention else 0)
    embed_fwd = 2 * tokens * geo.d_T * d_S
    head_fwd = 2 * tokens * geo.vocab * d_S  # a `hidden` cache adds the teacher's head, 2 tokens V d_T (not counted)
    targets_fwd = 0
    if clone:  # per position: the teacher layer's matrices on the cached input, o and down into student space
        targets_fwd = batch * positions * geo.layers * (2 * geo.d_T * (geo.layer_matrix_width - geo.q_w)
                                                        + 2 * 2 * geo.d_T * d_S)  # fmt: skip
    targets_bwd = targets_fwd and batch * positions * geo.layers * 2 * 2 * geo.d_T * d_S  # into P_o, P_down
    once = generate_once and grad_accum > 1 and not fsdp
    per_micro = (embed_fwd * 2 + geo.layers * layer_fwd * 3 + head_fwd + 2 * 2 * tokens * geo.vocab * d_S
                 + targets_fwd + targets_bwd)  # fmt: skip
    if checkpointing:  # the recomputation stops once the backward has what it needs (torch's early stop):
        # the layer's last product, the down target's projection into student space, is not redone
        redone_targets = targets_fwd and targets_fwd - batch * positions * geo.layers * 2 * geo.d_T * d_S
        per_micro += geo.layers * layer_fwd + redone_targets + (0 if once else geo.layers * gen_layer)
    generation = 2 * (geo.layers * gen_layer + gen_head)  # forward and the backward into P
    return grad_accum * per_micro + generation * (1 if once else grad_accum)


# ---- the plan ------------------------------------------------------------------------------------


MODES = (("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True))
"""(train.parallelism, train.activation_checkpointing) of every row of a plan."""


def plan(cfg: TrainJobConfig, geo: Geometry, seq_len: int, num_gpus: int, num_hosts: int = 1,
         gpu_tflops: float | None = None, positions: int = 8, bf16: bool = True,
         modes=MODES) -> list[dict]:  # fmt: skip
    """One row per (parallelism, activation checkpointing) of `modes`: memory per GPU and per host (GiB,
    by part), FLOPs per optimizer step per GPU and, at `gpu_tflops` (sustained TFLOP/s of one GPU),
    training tokens/s of all GPUs together. `cfg.student.hidden_size`, `cfg.train.batch_size`,
    `grad_accum`, `generate_once` and `loss_chunk_tokens` are the config's; `positions`: clone positions
    per sequence (the cache's act_positions)."""
    if num_gpus < 1 or num_hosts < 1 or num_gpus % num_hosts:
        raise ConfigError(f"--num-gpus {num_gpus} over --num-hosts {num_hosts}: use positive counts, the GPUs "
                          "split evenly over the hosts")  # fmt: skip
    tc, d_S = cfg.train, cfg.student.hidden_size
    if d_S > geo.d_T:
        raise ConfigError(f"student.hidden_size={d_S} exceeds the teacher's hidden size {geo.d_T}; pick a smaller one")
    untied = cfg.student.head == "untied" or not geo.tied
    clone = cfg.loss.alpha > 0 or cfg.loss.alpha_schedule != "constant"
    coefficients = fit_activations(bf16)
    tokens = num_gpus * tc.batch_size * tc.grad_accum * seq_len
    rows = []
    for parallelism, ckpt in modes:
        fsdp = parallelism == "fsdp2"
        gpu = memory(geo, d_S, tc.batch_size, seq_len, coefficients, num_gpus, fsdp, ckpt, tc.grad_accum,
                     tc.generate_once, bf16, tc.loss_chunk_tokens, untied)  # fmt: skip
        flops = step_flops(geo, d_S, tc.batch_size, seq_len, tc.grad_accum, positions, fsdp, ckpt,
                           tc.generate_once, clone)  # fmt: skip
        row = {"parallelism": parallelism, "activation_checkpointing": ckpt, "num_gpus": num_gpus,
               "num_hosts": num_hosts, "micro_batch": tc.batch_size, "seq_len": seq_len, "grad_accum": tc.grad_accum,
               "gpu_gib": gpu, "host_gib": host_memory(geo, num_gpus // num_hosts, bf16, num_gpus, fsdp),
               "flops_per_step": flops, "tokens_per_step": tokens,
               "tokens_per_s": tokens / (flops / (gpu_tflops * 1e12)) if gpu_tflops else None}  # fmt: skip
        row["configured"] = parallelism == tc.parallelism and ckpt == tc.activation_checkpointing
        rows.append(row)
    return rows


def format_plan(rows: list[dict], geo: Geometry, d_S: int) -> str:
    """The rows as a table in the shape of `accelerate estimate-memory`: a title, then one line per
    parallelism and activation checkpointing (`*` marks the config's own)."""
    first = rows[0]
    title = (f"{geo.name} -> d_S {d_S}: micro-batch {first['micro_batch']} x {first['seq_len']} tokens, grad_accum "
             f"{first['grad_accum']}, {first['num_gpus']} GPUs on {first['num_hosts']} host(s)")  # fmt: skip
    head = ["mode", "teacher", "trainable", "generated W^S", "activations", "logits", "GiB/GPU", "host GiB",
            "TFLOP/step/GPU", "tokens/s"]  # fmt: skip
    body = []
    for row in rows:
        gpu = row["gpu_gib"]
        mode = ("FSDP2" if row["parallelism"] == "fsdp2" else "DDP") + ("+ckpt" if row["activation_checkpointing"] else "")
        body.append([("* " if row["configured"] else "  ") + mode]
                    + [f"{gpu[k]:.1f}" for k in ("teacher_weights", "trainable_states", "generated_weights",
                                                  "activations", "logits", "total")]
                    + [f"{row['host_gib']['total']:.1f}", f"{row['flops_per_step'] / 1e12:,.1f}",
                       f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"])  # fmt: skip
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [title, rule, "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", rule]
    lines += ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
              + " |" for line in body]  # fmt: skip
    lines += [rule, "GiB/GPU: what one process holds on its GPU for a step (CUDA context and allocator slack on top); "
              "host GiB: teacher_load, the whole teacher per process under DDP, each process's shard of it under FSDP2."]
    return "\n".join(lines)

