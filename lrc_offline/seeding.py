"""Seeds derived from several keys (a run seed, a sequence index, an epoch, a shard), in two schemes.

- `stable_seed` / `stable_fraction`: sha256 of ``"tag:key:key..."``. For every draw whose result is
  stored in a cache (activation positions, sampled-KD draws, the activation budget). These values must
  never change: a shard rebuilt, or built by another worker or library version, has to be identical
  to its siblings, and caches already on disk were written with them. The tag keeps the draws of
  different purposes independent for the same keys.
- `mixed_seed` / `generator`: ``seed = (seed * 1_000_003 + key) mod (2**63 - 1)`` over the keys, in
  order. For the order in which training reads data: cheap, and a change would only reorder a run (and
  invalidate saved reading positions, which record the seed but not the scheme).

Both return non-negative 63-bit integers, valid for ``torch.Generator.manual_seed`` on every device.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["stable_seed", "stable_fraction", "mixed_seed", "generator"]

_MIX = 1_000_003
_MOD = 2**63 - 1


def _stable_digest(tag: str, keys: tuple[int, ...]) -> int:
    text = ":".join([tag, *(f"{key}" for key in keys)])
    return int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:8], "little")


def stable_seed(tag: str, *keys: int) -> int:
    """A 63-bit seed from `tag` and `keys`, the same in every process, platform and version."""
    return _stable_digest(tag, keys) & (2**63 - 1)


def stable_fraction(tag: str, *keys: int) -> float:
    """A number in [0, 1) from `tag` and `keys`, the same in every process, platform and version."""
    return _stable_digest(tag, keys) / 2**64


def mixed_seed(*keys: int) -> int:
    """A 63-bit seed mixing `keys` in order (cheap; for data order, not for anything stored)."""
    seed = 0
    for key in keys:
        seed = (seed * _MIX + int(key)) % _MOD
    return seed


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `mixed_seed(*keys)`."""
    return torch.Generator().manual_seed(mixed_seed(*keys))
