"""Seeds derived from several keys."""

import torch


def generator(*keys: int) -> torch.Generator:
    """A generator seeded by mixing `keys` (seed, epoch, ...) multiplicatively."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
