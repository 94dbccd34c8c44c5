"""The shared seed schemes reproduce the formulas the cache and the reader were built with."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from lrc_offline.cache.act_stats import act_layer_mask, act_present, layers_per_position
from lrc_offline.capture.positions import position_seed
from lrc_offline.seeding import generator, mixed_seed, stable_fraction, stable_seed

KEYS = [(0, 0), (0, 1), (1, 0), (7, 123_456), (2**40, 3), (12345, 2**31 + 5)]


def _old_sha(tag: str, seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{tag}:{seed}:{index}".encode("ascii")).digest()[:8], "little")


def _old_mix(*keys: int) -> int:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return seed


@pytest.mark.parametrize("seed,index", KEYS)
def test_stable_scheme_matches_the_stored_draws(seed, index):
    expected = _old_sha("lrc-positions", seed, index) & (2**63 - 1)
    assert stable_seed("lrc-positions", seed, index) == position_seed(seed, index) == expected
    fraction = _old_sha("lrc-act-budget", seed, index) / 2**64
    assert stable_fraction("lrc-act-budget", seed, index) == fraction
    assert act_present(seed, index, 0.5) == (fraction < 0.5)


def test_pinned_values():
    # Caches on disk were written with these: they must never change.
    assert stable_seed("lrc-positions", 0, 0) == 2943530153234914728
    assert stable_seed("lrc-positions", 1, 5) == 1927216146497460054
    assert [act_present(0, j, 0.5) for j in range(8)] == [False, True, False, True, True, False, True, True]
    assert mixed_seed(3, 1, 5) == 3000019000035
    assert act_layer_mask(0, 0, 6, 4, 0.34).int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]] * 3
    assert act_layer_mask(0, 1, 6, 4, 0.34).int().tolist() == [
        [0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 1], [1, 0, 1, 0]]


@pytest.mark.parametrize("layers,positions,fraction", [(30, 16, 0.25), (36, 32, 0.25), (36, 2, 0.25), (5, 7, 0.5),
                                                        (4, 3, 1e-3), (8, 8, 0.999)])  # fmt: skip
def test_act_layer_mask_gives_each_position_m_layers_and_covers_every_layer(layers, positions, fraction):
    m = layers_per_position(layers, fraction)
    assert m == max(1, math.ceil(fraction * layers - 1e-9))
    for index in range(5):
        mask = act_layer_mask(7, index, layers, positions, fraction)
        assert mask.shape == (layers, positions) and mask.dtype == torch.bool
        assert mask.sum(0).tolist() == [m] * positions
        per_layer = mask.sum(1)
        if positions * m >= layers:  # covered, as evenly as the cycle allows
            assert int(per_layer.min()) == positions * m // layers
            assert int(per_layer.max()) - int(per_layer.min()) <= 1
        assert torch.equal(mask, act_layer_mask(7, index, layers, positions, fraction))
        start = torch.zeros(positions, dtype=torch.bool)
        start[0] = True
        with_start = act_layer_mask(7, index, layers, positions, fraction, start)
        assert bool(with_start[:, 0].all()) and torch.equal(with_start[:, 1:], mask[:, 1:])
    assert act_layer_mask(7, 0, layers, positions, 1.0).all()


@pytest.mark.parametrize("keys", [(0,), (0, 0), (3, 1), (3, 1, 5), (2**62, 2**62, 9), (5, 0, 17)])
def test_mixed_scheme_matches_the_reader_order(keys):
    assert mixed_seed(*keys) == _old_mix(*keys)
    # online.epoch_order's seed * 1_000_003 + epoch is the same mix for small seeds
    if len(keys) == 2 and keys[0] < 2**40:
        assert mixed_seed(*keys) == keys[0] * 1_000_003 + keys[1]
    old = torch.randperm(50, generator=torch.Generator().manual_seed(_old_mix(*keys)))
    assert torch.equal(torch.randperm(50, generator=generator(*keys)), old)
