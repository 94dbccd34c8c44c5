"""The typed batch: the cache reader's collate derives the clone loss's keep mask and sink flags once, as a
naive per-element reading of the cache's fields gives them."""

from __future__ import annotations

import pytest

from lrc_offline.cache import CacheReader
from lrc_offline.capture.build import build_cache
from lrc_offline.config import CacheConfig
from lrc_offline.training.reader import collate

NUM_SEQ, NUM_POSITIONS, NUM_LAYERS = 32, 6, 2


@pytest.fixture(scope="module")
def budget_layer_subset_samples(tmp_path_factory) -> list[dict]:
    """Every sequence of a cache with an activation budget (half the sequences) and a layer subset (one of
    the two layers per position), as the reader hands them out."""
    root = tmp_path_factory.mktemp("budget_layers")
    cfg = CacheConfig(teacher="tiny-random:llama", corpus="tiny-text", seq_len=32, max_sequences=NUM_SEQ,
                      sequences_per_shard=8, act_positions=NUM_POSITIONS, act_fraction=0.5, act_layer_fraction=0.5,
                      act_dtype="float32")  # fmt: skip
    build_cache(cfg, root, progress=False)
    return list(CacheReader(root).iter_sequences())


def test_collate_computes_keep_mask_and_sink_flags_as_the_fields_say(budget_layer_subset_samples):
    samples = budget_layer_subset_samples
    clone = collate(samples).clone
    assert clone.keep_LBP.shape == (NUM_LAYERS, NUM_SEQ, NUM_POSITIONS)
    assert clone.sink_BP.shape == (NUM_SEQ, NUM_POSITIONS)
    for b, sample in enumerate(samples):
        present = bool(sample["act_present"][0])
        assert bool(clone.present_B[b]) == present
        for p in range(NUM_POSITIONS):
            token = int(sample["act_positions"][p])
            assert bool(clone.sink_BP[b, p]) == (int(sample["position_ids"][token]) == 0), (b, p)
            for layer in range(NUM_LAYERS):
                carried = present and bool(sample["act_layer_mask"][layer, p])
                assert bool(clone.keep_LBP[layer, b, p]) == carried, (layer, b, p)
    # The cache exercises every case: sequences with and without activations, layers left out at a
    # position, a sink at a document start past the sequence start (one in these 32 sequences).
    assert 0 < int(clone.present_B.sum()) < NUM_SEQ and clone.num_present() == int(clone.present_B.sum())
    assert not bool(clone.keep_LBP[:, clone.present_B].all())
    assert int(clone.sink_BP.sum()) > NUM_SEQ


def test_batch_to_moves_every_tensor_but_the_sequence_index(budget_layer_subset_samples):
    batch = collate(budget_layer_subset_samples[:4])
    moved = batch.to("meta")
    clone = moved.clone
    tensors = [moved.input_ids, moved.position_ids, moved.signal.ids, moved.signal.logprobs, clone.positions_BP,
               clone.keep_LBP, clone.sink_BP, clone.present_B, *clone.acts.values()]  # fmt: skip
    assert {t.device.type for t in tensors} == {"meta"}
    assert moved.sequence_index is batch.sequence_index
    assert batch.input_ids.device.type == "cpu"  # a copy: the batch itself is unchanged
