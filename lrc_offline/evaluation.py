"""Student against teacher on held-out text: perplexities, top-1 agreement and KL to the teacher.

Two ways. From a cache's held-out split (`evaluate_export_from_cache`): the exported student's CE, and KL
and top-1 agreement from the teacher signal the cache stored, with no teacher forward and no corpus (the
teacher's weights are read only for a `hidden` cache, whose signal goes through the teacher's head). From
a corpus (`evaluate_export`, `compare_models`): the teacher's forward on the held-out sequences (a few,
once), which is why this module lives outside `training/`; it also gives the teacher's own CE.

Document masking follows what was trained: a document-masked cache's held-out split is evaluated with each
packed document alone (its teacher signal was captured so); on a corpus, student and teacher both see each
document alone when the student was trained document-masked (its `lrc_config.json`).

Legend: N sequences, B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import read_manifest
from .config import ConfigError
from .data import PackedCorpus, load_heldout_documents, pack_documents
from .storage import Location, as_location
from .teacher.load import load_teacher, resolve_device
from .training.heldout import CacheHeldout, HeadFn, LogitsFn, evaluate_heldout, heldout_metrics
from .training.trainer import check_teacher_matches_cache

__all__ = ["compare_models", "heldout_sequences", "evaluate_export", "evaluate_export_from_cache", "format_table"]


def compare_models(
    student_fn: LogitsFn,
    teacher_fn: LogitsFn,
    input_ids_NT: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    position_ids_NT: torch.Tensor | None = None,
) -> dict[str, float]:
    """`heldout_metrics` of a student against a teacher, under the names `lrc-train eval` reports:
    student_ce / teacher_ce, student_ppl / teacher_ppl, kl, top1_agreement, tokens. With `position_ids_NT`,
    document-masked: both functions take (input ids, position ids) (see `heldout_metrics`)."""
    out = heldout_metrics(student_fn, input_ids_NT, batch_size, device, teacher_fn=teacher_fn,
                          position_ids_NT=position_ids_NT)  # fmt: skip
    out["student_ce"], out["student_ppl"] = out.pop("ce"), out.pop("ppl")
    return out


def heldout_sequences(corpus: str, text_field: str, heldout_docs: int, tokenizer, seq_len: int,
                      max_sequences: int | None, split: str = "train", config: str | None = None,
                      revision: str | None = None) -> torch.Tensor:  # fmt: skip
    """The packed held-out sequences: the last `heldout_docs` documents of the corpus (a dataset id's
    `split`, `config` and `revision`), which a cache built with the same `heldout_docs` never saw, packed
    as the cache's held-out split is (`data.packing`). Reads the corpus once, holding only those
    documents: for caches built before held-out splits, and for evaluation on any corpus."""
    return _heldout_packed(corpus, text_field, heldout_docs, tokenizer, seq_len, max_sequences, split, config,
                           revision).input_ids  # fmt: skip


def _heldout_packed(corpus: str, text_field: str, heldout_docs: int, tokenizer, seq_len: int,
                    max_sequences: int | None, split: str = "train", config: str | None = None,
                    revision: str | None = None) -> PackedCorpus:  # fmt: skip
    """`heldout_sequences` with their position ids (0 starts a document)."""
    if heldout_docs < 1:
        raise ConfigError("evaluation on held-out text needs heldout_docs >= 1 (documents kept out of the cache)")
    heldout = load_heldout_documents(corpus, heldout_docs, text_field, split, config, revision)
    return pack_documents(heldout, tokenizer, seq_len, max_sequences)


def evaluate_export(
    student_dir: str | Path,
    teacher,
    corpus: str,
    heldout_docs: int,
    seq_len: int,
    max_sequences: int | None = 32,
    text_field: str = "text",
    batch_size: int = 8,
    document_mask: bool | None = None,
    **dataset: str | None,
) -> dict[str, float]:
    """Load an exported student with plain `transformers` and compare it with `teacher` (a loaded Teacher) on
    the corpus's held-out documents (`dataset`: a dataset id's split, config and revision, as
    `heldout_sequences` takes them).

    `document_mask`: student and teacher see each packed document alone (position ids restarting at each
    document, `transformers`' packed-sequence masking). None: as the student was trained (the
    ``document_mask`` its `lrc_config.json` records; off when it records none)."""
    from transformers import AutoModelForCausalLM

    if document_mask is None:
        document_mask = _trained_document_mask(student_dir)
    device = next(teacher.model.parameters()).device
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
    student = student.to(device).eval()
    packed = _heldout_packed(corpus, text_field, heldout_docs, teacher.tokenizer, seq_len, max_sequences, **dataset)
    # Position ids restarting at each document, with no attention mask and no KV cache (with one, the
    # boundaries are ignored): `transformers` masks each packed document off from the others (None: positions
    # 0..T-1, one causal block).
    out = compare_models(lambda x, p=None: student(input_ids=x, position_ids=p, use_cache=False).logits,
                         lambda x, p=None: teacher.model(input_ids=x, position_ids=p, use_cache=False).logits,
                         packed.input_ids, batch_size, device,
                         position_ids_NT=packed.position_ids if document_mask else None)  # fmt: skip
    return out | {"document_mask": document_mask}


def _trained_document_mask(student_dir: str | Path) -> bool:
    """Whether the exported student at `student_dir` was trained document-masked (its `lrc_config.json`)."""
    info = Path(student_dir) / "lrc_config.json"
    return bool(json.loads(info.read_text()).get("document_mask", False)) if info.is_file() else False


def _hf_head_fn(model, teacher_head_VD: torch.Tensor | None) -> HeadFn:
    """The `HeadFn` of a plain `transformers` causal LM: its decoder's final normed hidden state and head."""
    decoder, head_VS = model.get_decoder(), model.get_output_embeddings().weight

    def head_fn(input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None):
        # as in `evaluate_export`: document-masked by the position ids, without a KV cache
        hidden = decoder(input_ids=input_ids_BT, position_ids=position_ids_BT, use_cache=False).last_hidden_state
        return hidden, head_VS, teacher_head_VD

    return head_fn


def evaluate_export_from_cache(
    student_dir: str | Path,
    cache: str | Path | Location,
    max_sequences: int | None = None,
    teacher: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> dict[str, float]:
    """An exported student (loaded with plain `transformers`) on the cache's held-out split: student_ce,
    student_ppl, and from the cached teacher signal kl (at the cache's temperature; 1 for a `hidden` cache)
    and top1_agreement; tokens, sequences. No teacher forward: a `hidden` cache loads `teacher` (default:
    the cache's, checked against its fingerprints) for its output head alone.

    Raises:
        CacheFormatError: the cache has no held-out split.
    """
    from transformers import AutoModelForCausalLM

    cache = as_location(cache)
    manifest = read_manifest(cache)
    heldout = CacheHeldout(cache, max_sequences)
    device = resolve_device(device)
    built = manifest.config
    teacher_head_VD = None
    if built.logit_mode == "hidden":
        name = teacher or manifest.teacher_name
        loaded = load_teacher(name, dtype="float32", device=device)
        check_teacher_matches_cache(loaded.model, loaded.tokenizer, name, manifest.fingerprints,
                                    repr(manifest.teacher_name), f"the cache at {cache}")  # fmt: skip
        teacher_head_VD = loaded.model.get_output_embeddings().weight.detach()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
    student = student.to(device).eval()
    temperature = 1.0 if built.logit_mode == "hidden" else built.temperature
    # A document-masked cache's signal is the teacher's with each document alone: the student is measured so too.
    result = evaluate_heldout(_hf_head_fn(student, teacher_head_VD), heldout, batch_size, device, temperature,
                              document_mask=manifest.document_mask)  # fmt: skip
    out = {"student_ce": result["ce"], "student_ppl": result["ppl"], "tokens": result["tokens"],
           "sequences": result["sequences"], "temperature": temperature, "document_mask": manifest.document_mask,
           "source": f"held-out split of {cache}"}  # fmt: skip
    if "kl" in result:
        out.update(kl=result["kl"], top1_agreement=result["top1"])
    return out


def format_table(metrics: dict[str, float]) -> str:
    """A short two-column table of the metrics (the teacher's column empty where it did not run)."""

    def teacher(key: str, spec: str) -> str:
        return format(metrics[key], spec) if key in metrics else ""

    def student(key: str, spec: str) -> str:
        return format(metrics[key], spec) if key in metrics else "-"

    rows = [("", "student", "teacher"),
            ("cross-entropy (nats)", f"{metrics['student_ce']:.4f}", teacher("teacher_ce", ".4f")),
            ("perplexity", f"{metrics['student_ppl']:.2f}", teacher("teacher_ppl", ".2f")),
            ("KL(teacher||student)", student("kl", ".4f"), ""),
            ("top-1 agreement", student("top1_agreement", ".3f"), ""),
            ("tokens", str(metrics["tokens"]), "")]  # fmt: skip
    return "\n".join(f"{a:<22}{b:>12}{c:>12}" for a, b, c in rows)
