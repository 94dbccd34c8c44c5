"""A synchronous hidden-state connector for vLLM's `extract_hidden_states` method (imported by vLLM only).

vLLM's `ExampleHiddenStatesConnector` writes a request's hidden states after the request finished,
through a CUDA copy stream, pinned host memory and a writer thread, and the client waits on a file lock;
on the CPU build those CUDA calls fail, and with the engine in the calling process the write would only
happen at a later engine step that never comes. This variant writes each prompt's states in the same
engine step that computed them (prefill with chunking off computes a whole prompt in one step), before
the step's output reaches the client, so a finished request's file is always complete. It serves CPU
and GPU alike; the copy to host memory is synchronous.

Each file holds `hidden_states` [T, num_layers_asked, D] (the model's dtype) and `token_ids` [T].
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

__all__ = ["SyncHiddenStatesConnector"]


@dataclass
class _SaveThisStep(KVConnectorMetadata):
    """Scheduler -> worker: the prompts whose prefill this step completes."""

    saves: list[PendingSave] = field(default_factory=list)


class SyncHiddenStatesConnector(ExampleHiddenStatesConnector):
    """Writes `<shared_storage_path>/<request id>.safetensors` at the end of each prompt's prefill step."""

    def _filename(self, request_id: str) -> str:
        return os.path.join(self._storage_path, f"{request_id}.safetensors")

    # ---- scheduler side ---------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = _SaveThisStep()
        for new in scheduler_output.scheduled_new_reqs:
            prompt = new.prompt_token_ids or []
            end = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
            if end != len(prompt):
                raise RuntimeError(
                    f"request {new.req_id}: its prompt ({len(prompt)} tokens) was split over engine steps "
                    f"({end} scheduled); start the engine with enable_chunked_prefill=False and prefix caching off"
                )
            meta.saves.append(
                PendingSave(new.req_id, self._filename(new.req_id), torch.tensor(prompt),
                            list(new.block_ids[self._cache_kv_group_id]))
            )  # fmt: skip
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Already written during the prefill step: the blocks may be freed at once.
        return False, {"hidden_states_path": self._filename(request.request_id)}

    # ---- worker side --------------------------------------------------------------------------------

    def wait_for_save(self) -> None:
        """Runs after the step's forward and the hidden-state extractor: the states are in the cache."""
        if not self._is_tp_rank_zero or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, _SaveThisStep):
            return
        block = self._block_size
        for pending in meta.saves:
            block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
            slots = (torch.arange(block).unsqueeze(0) + block_ids.unsqueeze(1) * block).flatten()
            states = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), len(pending.token_ids))
            os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
            tmp = pending.filename + ".tmp"
            save_file({"hidden_states": states.cpu().contiguous(), "token_ids": pending.token_ids}, tmp)
            os.replace(tmp, pending.filename)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # nothing is ever in flight
