"""Shared fixtures: tiny random teachers of every supported family, built in-process."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from lrc_offline.teacher.tiny import TINY_FAMILIES, tiny_teacher, tiny_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@functools.lru_cache(maxsize=None)
def _teacher(family: str):
    return tiny_teacher(family)


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def teacher(family):
    """A frozen tiny teacher of each family (shared across tests; never modified)."""
    model = _teacher(family)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
