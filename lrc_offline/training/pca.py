"""The PCA basis of a cache: one streaming pass over its cached residual vectors, stored with it under
the cache's derived files (``CACHE/derived/pca/``, see `cache.derived_location`).

Every student size of a sweep reuses the same d_T x d_T second moment and takes its own top d_S
directions, so the pass runs once per cache (per sink setting).
"""

from __future__ import annotations

import logging
from pathlib import Path

import safetensors.torch
import torch

from ..batch import RESIDUAL_FIELDS, Batch, clone_activations, logit_field_names
from ..cache import CacheReader, derived_location
from ..config import ConfigError, TrainJobConfig
from ..storage import Location, as_location
from ..student.init import SecondMoment, calibrate_head_scale
from ..student.lrc import LRCStudent
from .objective import logit_loss
from .reader import batch_to_device, collate

__all__ = ["cache_second_moment", "second_moment_path", "head_scale_sequences", "fit_head_scale", "cache_head_scale_batches"]

log = logging.getLogger(__name__)

DERIVED_NAME = "pca"
"""The cache's derived files this module keeps (``CACHE/derived/pca/``)."""
LEGACY_DIR = "pca"
"""Where earlier versions kept the second moment: at the cache root. Still read (never written): the pass
reads every cached residual vector, most of a cache's bytes, so a stored result is worth finding."""


def second_moment_name(exclude_sink: bool, max_sequences: int | None = None) -> str:
    """The second moment's file name, in the cache's derived ``pca`` folder."""
    name = f"second_moment{'-nosink' if exclude_sink else ''}{f'-{max_sequences}seq' if max_sequences else ''}"
    return f"{name}.safetensors"


def second_moment_path(cache_dir: str | Path, exclude_sink: bool, max_sequences: int | None = None) -> Path:
    """Where the second moment of the local cache directory `cache_dir` is kept."""
    return Path(derived_location(cache_dir, DERIVED_NAME).name_of(second_moment_name(exclude_sink, max_sequences)))


def _accumulate(reader: CacheReader, exclude_sink: bool, max_sequences: int | None) -> SecondMoment:
    manifest = reader.manifest
    if not manifest.has_residuals:
        raise ConfigError(
            f"PCA init needs residual activations, but the cache at {reader.root} has none "
            f"(activation_mode={manifest.config.activation_mode!r}); build it with "
            "activation_mode=residual, or use student.init=random"
        )
    moment = SecondMoment(manifest.geometry.hidden_size)
    seen = 0
    for index in reader.complete_shards():
        if max_sequences is not None and seen >= max_sequences:
            break
        clone = clone_activations(reader.read_shard(index, [n for n in RESIDUAL_FIELDS if manifest.has_field(n)]))
        # The sequences taken: those that carry activations (an activation budget leaves the others
        # zeros), up to max_sequences in all.
        taken_N = torch.ones(len(clone.positions_BP), dtype=torch.bool) if clone.present_B is None else clone.present_B
        if max_sequences is not None:
            taken_N = taken_N & (taken_N.cumsum(0) <= max_sequences - seen)
        seen += int(taken_N.sum())
        # Both residual streams a layer reads: its input h (read by q, k, v) and h + a after attention
        # (read by gate, up). Pooling both beats h alone at step 0 on SmolLM2 (benchmarks/README.md,
        # "Which residual vectors form the basis").
        h_NLPD = clone.acts["input"].float()
        mid_NLPD = h_NLPD + clone.acts["attn"].float()
        # The stored (layer, position) rows of the sequences taken (a layer-subset cache holds zeros in
        # the others), without the sinks with exclude_sink.
        keep_NLP = taken_N[:, None, None].expand(h_NLPD.shape[:3])
        if clone.keep_LBP is not None:
            keep_NLP = keep_NLP & clone.keep_LBP.transpose(0, 1)
        if exclude_sink:
            keep_NLP = keep_NLP & ~clone.sink_BP[:, None, :]
        if not bool(keep_NLP.all()):
            h_NLPD, mid_NLPD = h_NLPD[keep_NLP], mid_NLPD[keep_NLP]  # [rows, D]
        moment.update(h_NLPD)
        moment.update(mid_NLPD)
    return moment


def cache_second_moment(
    cache_dir: str | Path | Location, exclude_sink: bool = False, max_sequences: int | None = None
) -> SecondMoment:
    """The second moment of the cache's RMS-normalised residual vectors (layer inputs h and post-attention
    streams h + a, all layers and positions of the
    first `max_sequences` complete sequences, or all), read from ``CACHE/derived/pca/`` (or, from caches
    of earlier versions, ``CACHE/pca/``) when stored there for the cache's current complete shards, else
    computed and saved under ``CACHE/derived/pca/`` (atomically)."""
    location = as_location(cache_dir)
    store = derived_location(location, DERIVED_NAME)
    name = second_moment_name(exclude_sink, max_sequences)
    reader = CacheReader(location)
    # "pooled-2": the layer inputs and the post-attention streams (files of the input-only pass are redone)
    fingerprint = "pooled-2:" + reader.manifest.fingerprints["corpus"] + ":" + str(reader.complete_shards())
    for where in (store, location / LEGACY_DIR):
        if where.is_file(name):
            data = safetensors.torch.load(where.read_bytes(name))  # safetensors: raw tensors, no pickle
            stored = bytes(data.pop("fingerprint").tolist()).decode()
            if stored == fingerprint:
                return SecondMoment.from_state_dict(data)
            log.info("%s is stale (the cache's complete shards changed); recomputing", where.name_of(name))
    moment = _accumulate(reader, exclude_sink, max_sequences)
    state = moment.state_dict() | {"fingerprint": torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)}
    try:
        store.write_bytes(name, safetensors.torch.save(state))
    except OSError as err:  # a read-only cache still trains; the pass just is not reused
        log.warning("could not store the PCA second moment with the cache (%s); using it in memory", err)
    return moment


def head_scale_sequences(student: LRCStudent, cfg: TrainJobConfig) -> int:
    """How many sequences the PCA head scale is fitted on: `cfg.student.pca_calibrate_sequences`, or 0 when
    PCA is an exact rotation (d_S = d_T) or the objective has no logit loss to fit."""
    if student.d_student == student.d_teacher or (cfg.loss.kd_weight == 0 and cfg.loss.beta == 0):
        return 0
    return cfg.student.pca_calibrate_sequences


def fit_head_scale(student: LRCStudent, batches: list[Batch], cfg: TrainJobConfig, document_mask: bool = False) -> dict:
    """Fit the PCA-initialised student's head scale to the objective's KD + CE on `batches` (see
    `student.init.calibrate_head_scale`), each packed document seen alone under `document_mask` (the
    student's masking as training resolved it); returns the record for the checkpoint's init info. No batches
    (see `head_scale_sequences`) keep the folded scale."""
    if not batches:
        return {"head_scale": 1.0}
    # The teacher's head as the forward returns it: a sharded student holds it whole only there.
    scale = calibrate_head_scale(student, batches, lambda logits, batch, teacher_head_VD: logit_loss(
        logits, batch, cfg.loss, teacher_head_VD), pass_teacher_head=True, document_mask=document_mask)  # fmt: skip
    num = sum(len(batch.input_ids) for batch in batches)
    log.info("PCA init: head scale %.3f fitted on %d sequences", scale, num)
    return {"head_scale": scale, "head_scale_sequences": num}


def cache_head_scale_batches(reader: CacheReader, num: int, batch_size: int, device) -> list[Batch]:
    """The first `num` complete cached sequences (their logit fields only), as batches on `device`, for
    `fit_head_scale`."""
    names = logit_field_names(reader.manifest.field_names)
    samples = []
    for index in reader.complete_shards():
        if len(samples) >= num:
            break
        shard = reader.read_shard(index, names)
        take = min(len(range(*reader.shard_range(index))), num - len(samples))
        samples += [{k: v[i] for k, v in shard.items()} for i in range(take)]
    return [batch_to_device(collate(samples[lo : lo + batch_size]), torch.device(device))
            for lo in range(0, len(samples), batch_size)]  # fmt: skip
