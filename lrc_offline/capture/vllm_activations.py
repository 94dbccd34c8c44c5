"""Residual activations from vLLM: each layer's input h_i and attention output a_T at the sampled positions.

vLLM has no API for per-layer activations, so a worker extension (engine arg `worker_extension_cls`, reached
through `LLM.collective_rpc`) puts PyTorch hooks on the vLLM model's decoder layers, the same modules the
`transformers` backend hooks (`lrc_offline.teacher.hooks`):

    input   a forward pre-hook on the decoder layer. vLLM's Llama-family layers take (positions, hidden,
            residual) and fuse the residual add into the input RMSNorm, in place, so h_i = hidden + residual
            (hidden alone at the first layer, where residual is None), summed before the layer runs.
    attn    a forward hook on the layer's attention module: its output is o_proj's, after the tensor-parallel
            reduce, before the post-attention norm adds it to the residual (in place).

vLLM runs the prompts of a step as one flat token stream. Each prompt carries, in its sampling parameters'
`extra_args`, a key and the positions wanted from it; at every step the hooks find each prompt's slice of
the stream from the model runner (`input_batch.req_ids`, `query_start_loc`) and keep the rows whose RoPE
positions are wanted, so a prompt split over steps (chunked prefill) is gathered correctly too. The rows
stay on the worker's device until `lrc_tap_collect` returns them. With pipeline parallelism each stage
gathers the layers it holds; with tensor parallelism every rank holds the same rows; the caller merges.

It needs eager execution (the hooks run Python per step, which torch.compile would trace away and CUDA
graphs would replay stale) and full prompts (no prefix caching, which would skip the cached tokens' forward).

Legend: B batch, P positions, L layers, D hidden, W width of a clone term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save
from torch import nn

from ..cache.act_stats import act_layer_mask, act_present, batch_act_sums, keep_mask, sink_flags
from ..config import CLONE_TERMS, CacheConfig
from ..teacher.adapters import ArchAdapter

__all__ = ["ActivationTap", "EXTENSION", "TAP_ARG", "tap_request", "merge_worker_rows", "clone_targets",
           "residual_fields"]  # fmt: skip

EXTENSION = "lrc_offline.capture.vllm_activations.ActivationTap"
TAP_ARG = "lrc_offline_tap"
"""The `SamplingParams.extra_args` entry naming a prompt's key and wanted positions."""


def tap_request(key: str, positions: list[int]) -> dict:
    """The `extra_args` that ask the tap for `positions` (ascending, unique) of one prompt, stored under `key`."""
    return {TAP_ARG: {"key": key, "positions": [int(p) for p in positions]}}


@dataclass
class _Rows:
    """One prompt's gathered rows on the worker: term -> [L, P, D], and which (layer, position) arrived."""

    positions: torch.Tensor
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    seen_LP: torch.Tensor | None = None


@dataclass
class _TapState:
    layers: list[int]
    handles: list = field(default_factory=list)
    rows: dict[str, _Rows] = field(default_factory=dict)
    plan: list | None = None
    """This step's (key, flat token indices, row indices); None until the step's first hooked layer."""
    current_positions: torch.Tensor | None = None
    """The step's flat RoPE positions, from the layer's pre-hook to its attention hook."""


class ActivationTap:
    """Mixed into vLLM's worker class by vLLM (`worker_extension_cls`); the methods run in every worker."""

    def lrc_tap_install(self, layers_path: str, attn_name: str, layers: list[int]) -> int:
        """Hook `layers` of the model; returns how many of them this worker holds (pipeline stages)."""
        self.lrc_tap_remove()
        model = self.model_runner.get_model()
        decoder_layers = model.get_submodule(layers_path)
        state = _TapState(layers=list(layers))
        # A step's plan is rebuilt at its first hooked layer: the whole model's pre-hook marks a new step.
        state.handles.append(model.register_forward_pre_hook(lambda module, args: setattr(state, "plan", None)))
        held = 0
        for slot, index in enumerate(layers):
            layer = decoder_layers[index]
            if not hasattr(layer, attn_name):  # a pipeline-parallel placeholder: another stage holds it
                continue
            held += 1
            state.handles.append(layer.register_forward_pre_hook(self._lrc_input_hook(state, slot), with_kwargs=True))
            state.handles.append(getattr(layer, attn_name).register_forward_hook(self._lrc_attn_hook(state, slot)))
        self._lrc_tap = state
        return held

    def lrc_tap_remove(self) -> None:
        state = getattr(self, "_lrc_tap", None)
        if state is not None:
            for handle in state.handles:
                handle.remove()
            self._lrc_tap = None

    def lrc_tap_collect(self, keys: list[str]) -> dict[str, bytes]:
        """The rows of `keys`, forgotten here: per key, safetensors bytes of term -> [L, P, D] and `seen` [L, P].
        Bytes, because an engine in its own process returns RPC results through msgpack, which turns
        tensors into nested lists."""
        state: _TapState = self._lrc_tap
        out = {}
        for key in keys:
            rows = state.rows.pop(key, None)
            if rows is None:
                continue
            tensors = {term: value.cpu().contiguous() for term, value in rows.acts.items()}
            out[key] = save({**tensors, "seen": rows.seen_LP.cpu().contiguous()})
        return out

    def lrc_tap_clear(self) -> None:
        """Forget every gathered row (after a failed call, whose prompts will not be collected)."""
        if getattr(self, "_lrc_tap", None) is not None:
            self._lrc_tap.rows.clear()

    # ---- inside the forward -----------------------------------------------------------------------------

    def _lrc_plan(self, state: _TapState, positions: torch.Tensor) -> list:
        """Which flat tokens of this step are wanted, per tapped prompt."""
        runner = self.model_runner
        req_ids = list(runner.input_batch.req_ids)
        starts = runner.query_start_loc.cpu[: len(req_ids) + 1].tolist()
        flat_positions = positions.cpu()
        plan = []
        for i, req_id in enumerate(req_ids):
            request = runner.requests.get(req_id)
            params = getattr(request, "sampling_params", None)
            tap = (params.extra_args or {}).get(TAP_ARG) if params is not None else None
            if tap is None:
                continue
            key = tap["key"]
            if key not in state.rows:
                state.rows[key] = _Rows(positions=torch.tensor(tap["positions"], dtype=torch.long))
            wanted = state.rows[key].positions
            chunk = flat_positions[starts[i] : starts[i + 1]].long()
            token, row = torch.nonzero(chunk[:, None] == wanted[None, :], as_tuple=True)
            if len(token):
                plan.append((key, (token + starts[i]).to(positions.device), row.to(positions.device)))
        return plan

    def _lrc_store(self, state: _TapState, slot: int, term: str, x_ND: torch.Tensor, positions: torch.Tensor):
        if state.plan is None:
            state.plan = self._lrc_plan(state, positions)
        for key, token, row in state.plan:
            rows = state.rows[key]
            if term not in rows.acts:
                shape = (len(state.layers), len(rows.positions), x_ND.shape[-1])
                rows.acts[term] = torch.zeros(shape, dtype=x_ND.dtype, device=x_ND.device)
            if rows.seen_LP is None:
                rows.seen_LP = torch.zeros(len(state.layers), len(rows.positions), dtype=torch.bool,
                                           device=x_ND.device)  # fmt: skip
            rows.acts[term][slot, row] = x_ND.index_select(0, token)
            if term == "attn":
                rows.seen_LP[slot, row] = True

    def _lrc_input_hook(self, state: _TapState, slot: int):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            positions = args[0] if args else kwargs["positions"]
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            residual = args[2] if len(args) > 2 else kwargs.get("residual")
            state.current_positions = positions
            self._lrc_store(state, slot, "input", hidden if residual is None else hidden + residual, positions)

        return pre_hook

    def _lrc_attn_hook(self, state: _TapState, slot: int):
        def hook(module: nn.Module, args: tuple, output):
            attn_ND = output[0] if isinstance(output, tuple) else output
            self._lrc_store(state, slot, "attn", attn_ND, state.current_positions)

        return hook


def merge_worker_rows(per_worker: list[dict], keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """One `lrc_tap_collect` answer from the answers of every worker: pipeline stages fill different
    layers, tensor-parallel ranks the same ones; every (layer, position) of every key must have arrived."""
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for answer in per_worker:
        for key, data in answer.items():
            got = load(data)
            if key not in merged:
                merged[key] = {name: value.clone() for name, value in got.items()}
                continue
            mine = merged[key]
            new_LP = got["seen"] & ~mine["seen"]
            for term in ("input", "attn"):
                if term in got:
                    mine.setdefault(term, torch.zeros_like(got[term]))[new_LP] = got[term][new_LP]
            mine["seen"] |= got["seen"]
    for key in keys:
        if key not in merged or not bool(merged[key]["seen"].all()):
            raise RuntimeError(f"vLLM computed no activations at some wanted positions of prompt {key}: "
                               "was prefix caching on, or a prompt truncated?")  # fmt: skip
    return merged


@torch.no_grad()
def clone_targets(
    model: nn.Module, adapter: ArchAdapter, layers: list[int], h_LBPD: torch.Tensor, a_LBPD: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The seven clone targets term -> [L, B, P, W], recomputed from the residuals with the `transformers`
    teacher's own modules (as training recomputes them): for the cache's activation statistics."""
    decoder_layers = model.get_submodule(adapter.layers)
    param = next(model.parameters())
    per_term: dict[str, list[torch.Tensor]] = {m: [] for m in CLONE_TERMS}
    for slot, index in enumerate(layers):
        layer = decoder_layers[index]
        attn, mlp = layer.get_submodule(adapter.attn), layer.get_submodule(adapter.mlp)
        h, a = h_LBPD[slot].to(param), a_LBPD[slot].to(param)
        x = layer.get_submodule(adapter.input_norm)(h)
        x2 = layer.get_submodule(adapter.post_norm)(h + a)
        gate, up = mlp.gate_proj(x2), mlp.up_proj(x2)
        values = {"q": attn.q_proj(x), "k": attn.k_proj(x), "v": attn.v_proj(x), "o": a, "gate": gate, "up": up,
                  "down": mlp.down_proj(mlp.act_fn(gate) * up)}  # fmt: skip
        for term in CLONE_TERMS:
            per_term[term].append(values[term])
    return {term: torch.stack(values) for term, values in per_term.items()}


def residual_fields(
    cfg: CacheConfig, h_LBPD: torch.Tensor, a_LBPD: torch.Tensor, targets: dict[str, torch.Tensor],
    positions_BP: torch.Tensor, position_ids_BT: torch.Tensor, sequence_indices: list[int], num_layers: int,
) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
    """The residual-mode cache fields and activation statistics, as `capture.build.capture_batch` makes
    them from the hf backend's hooks: the same positions, layer subset, budget and statistics."""
    present_B = torch.tensor([act_present(cfg.seed, j, cfg.act_fraction) for j in sequence_indices])
    stats = {"act_stats": batch_act_sums(targets, sink_flags(positions_BP, position_ids_BT), present_B)}
    out = {"act_positions": positions_BP.to(torch.int32)}
    layer_mask_BLP = None
    if cfg.act_layer_fraction < 1:
        start_BP = positions_BP == 0  # the sequence start carries every layer
        layer_mask_BLP = torch.stack([
            act_layer_mask(cfg.seed, j, num_layers, positions_BP.shape[1], cfg.act_layer_fraction, start_P)
            for j, start_P in zip(sequence_indices, start_BP)])  # fmt: skip
        out["act_layer_mask"] = layer_mask_BLP.to(torch.uint8)
    keep_BLP = keep_mask(present_B if cfg.act_fraction < 1 else None, layer_mask_BLP, num_layers,
                         positions_BP.shape[1])  # fmt: skip
    for name, acts_LBPD in (("act_input", h_LBPD), ("act_attn", a_LBPD)):
        acts_BLPD = acts_LBPD.transpose(0, 1).float()
        out[name] = acts_BLPD if keep_BLP is None else acts_BLPD * keep_BLP[..., None]
    if cfg.act_fraction < 1:
        out["act_present"] = present_B.to(torch.uint8)[:, None]
    return out, stats
