"""Explicit, hierarchical randomness.

Every sampler in fedmeta takes a generator derived from (experiment seed, *keys), e.g.
(seed, "cohort", round) or (seed, "client", client_id). No code path touches a global RNG, so
a run is a pure function of its config and seed, and any client's data or any round's cohort can be
regenerated on demand, on any worker, in any order.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(k: int | str) -> int:
    if isinstance(k, str):
        # crc32 is stable across processes (unlike hash()), so workers agree on streams.
        return zlib.crc32(k.encode())
    if k < 0:
        raise ValueError(f"seed keys must be non-negative, got {k}")
    return int(k)


def seed_sequence(seed: int, *keys: int | str) -> np.random.SeedSequence:
    return np.random.SeedSequence([_key(seed), *(_key(k) for k in keys)])


def np_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy Generator for the stream named by (seed, *keys)."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def torch_gen(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator for the stream named by (seed, *keys)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed_sequence(seed, *keys).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g
