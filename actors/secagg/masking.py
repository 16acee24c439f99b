"""Client-side masking and server-side unmasking of quantized vectors.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
section 4), restricted to graph neighbours as in SecAgg+ (Bell et al. 2020): client i sends

    y_i = q_i + PRG(b_i) + sum_{j in N(i)} sgn(i, j) * PRG(s_ij)   (mod 2^b)

with sgn(i, j) = +1 if i < j else -1, so that PRG(s_ij) enters once with each sign. Summed over
clients whose neighbours all survived, the pairwise masks cancel; the server removes the self
masks PRG(b_i) of survivors (seeds b_i reconstructed from Shamir shares) and, for each dropped
client d, the "dangling" masks sgn(i, d) * PRG(s_id) its surviving neighbours i added (seeds
recomputed from d's reconstructed private key).

The server must never learn both b_i and s_i^SK of one client (that would unmask q_i); the
protocol layer enforces it, and `unmask_sum` refuses self seeds of dropped clients as a guard.

All arithmetic is in uint64 with wraparound, reduced mod 2^b (2^b divides 2^64). Masks are
expanded with `expand_masks` in chunks of seeds: vectorized, with memory bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from fedmeta.actors.secagg.prg import expand_masks
from fedmeta.actors.secagg.quantize import MAX_BITS

Graph = Sequence[AbstractSet[int]] | Mapping[int, AbstractSet[int]]

# Seeds expanded per `expand_masks` call: 32 masks of 100k elements are ~25 MiB at a time.
_CHUNK = 32


def _check_bits(bits: int) -> np.uint64:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    return np.uint64((1 << bits) - 1)


def _sum_masks(seeds: list[bytes], n: int, bits: int) -> np.ndarray:
    """sum_s PRG(s) in the keystream's own word width, shape (n,): uint32 for bits <= 32 (wraps mod
    2^32, a multiple of 2^bits), else uint64; the caller reduces mod 2^bits."""
    total = np.zeros(n, dtype=np.uint32 if bits <= 32 else np.uint64)
    for start in range(0, len(seeds), _CHUNK):
        block = expand_masks(seeds[start : start + _CHUNK], n, bits, native=True)  # (chunk, n)
        total += block.sum(axis=0, dtype=total.dtype)
    return total


def signed_mask_sum(plus: list[bytes], minus: list[bytes], n: int, bits: int) -> np.ndarray:
    """(sum PRG(plus) - sum PRG(minus)) mod 2^bits, shape (n,) uint64."""
    mask = _check_bits(bits)
    total = _sum_masks(plus, n, bits)
    if minus:
        total -= _sum_masks(minus, n, bits)  # wraps in the word width, a multiple of 2^bits
    total = total.astype(np.uint64, copy=False)  # widened once
    total &= mask
    return total


def _split_pairs(
    my_id: int, neighbours: Iterable[int], pair_seeds: Mapping[int, bytes]
) -> tuple[list[bytes], list[bytes]]:
    """Seeds of my pairwise masks split by sign: +PRG(s_ij) if my_id < j, else -PRG(s_ij)."""
    plus, minus = [], []
    for j in sorted(neighbours):
        if j == my_id:
            raise ValueError(f"client {my_id} lists itself as a neighbour")
        if j not in pair_seeds:
            raise ValueError(f"client {my_id} has no pairwise seed for neighbour {j}")
        (plus if my_id < j else minus).append(pair_seeds[j])
    return plus, minus


def pairwise_mask_sum(
    my_id: int, neighbours: Iterable[int], pair_seeds: Mapping[int, bytes], n: int, bits: int
) -> np.ndarray:
    """sum_{j in neighbours} sgn(my_id, j) * PRG(s_ij) mod 2^bits, shape (n,)."""
    plus, minus = _split_pairs(my_id, neighbours, pair_seeds)
    return signed_mask_sum(plus, minus, n, bits)


def mask_vector(
    q: np.ndarray,
    self_seed: bytes,
    my_id: int,
    neighbours: Iterable[int],
    pair_seeds: Mapping[int, bytes],
    bits: int,
) -> np.ndarray:
    """The masked input y = q + PRG(self_seed) + pairwise_mask_sum (mod 2^bits), shape (n,)."""
    mask = _check_bits(bits)
    q = np.asarray(q, dtype=np.uint64)
    if q.ndim != 1:
        raise ValueError(f"q must be a 1-D quantized vector, got shape {q.shape}")
    plus, minus = _split_pairs(my_id, neighbours, pair_seeds)
    # The self mask has sign +, so it joins the "+" seeds: one batched expansion for all masks.
    masks = signed_mask_sum([self_seed] + plus, minus, q.shape[0], bits)
    masks += q  # in place: the masks are this call's own array
    masks &= mask
    return masks


def unmask_sum(
    masked_sum: np.ndarray,
    surviving_ids: Iterable[int],
    dropped_ids: Iterable[int],
    self_seeds_of_survivors: Mapping[int, bytes],
    pair_seeds_of_dropped: Mapping[int, Mapping[int, bytes]],
    graph: Graph,
    n: int,
    bits: int,
) -> np.ndarray:
    """Remove all masks from the sum of the survivors' masked vectors; returns sum q_i mod 2^bits.

    masked_sum: (n,) = sum over surviving i of y_i mod 2^bits.
    self_seeds_of_survivors: {i: b_i} for every survivor (and nobody else).
    pair_seeds_of_dropped: {d: {i: s_di}} for each dropped d and each surviving neighbour i of d.
    graph: the neighbour sets the clients masked with; every survivor's neighbours must be
    survivors or dropped (i.e. the graph restricted to the clients that shared keys).
    """
    mask = _check_bits(bits)
    masked_sum = np.asarray(masked_sum, dtype=np.uint64)
    if masked_sum.shape != (n,):
        raise ValueError(f"masked_sum has shape {masked_sum.shape}, expected ({n},)")
    survivors = {int(i) for i in surviving_ids}
    dropped = {int(d) for d in dropped_ids}
    _check_unmask_roles(survivors, dropped, self_seeds_of_survivors, pair_seeds_of_dropped, graph)
    plus, minus = _unmask_seeds(survivors, dropped, self_seeds_of_survivors, pair_seeds_of_dropped, graph)
    return (masked_sum + signed_mask_sum(plus, minus, n, bits)) & mask


def _check_unmask_roles(
    survivors: set[int],
    dropped: set[int],
    self_seeds_of_survivors: Mapping[int, bytes],
    pair_seeds_of_dropped: Mapping[int, Mapping[int, bytes]],
    graph: Graph,
) -> None:
    """Survivors and dropped clients are disjoint, the seeds given are exactly theirs, and every
    survivor's neighbours are one or the other."""
    if survivors & dropped:
        raise ValueError(f"clients both surviving and dropped: {sorted(survivors & dropped)}")
    if set(self_seeds_of_survivors) != survivors:
        raise ValueError(
            "self seeds must be given for exactly the survivors (missing: "
            f"{sorted(survivors - set(self_seeds_of_survivors))}, unexpected: "
            f"{sorted(set(self_seeds_of_survivors) - survivors)}); a dropped client's self seed "
            "must never be revealed next to its pairwise key"
        )
    if not set(pair_seeds_of_dropped) <= dropped:
        raise ValueError(
            f"pairwise seeds given for non-dropped clients {sorted(set(pair_seeds_of_dropped) - dropped)}"
        )
    for i in survivors:
        unknown = set(graph[i]) - survivors - dropped
        if unknown:
            raise ValueError(
                f"survivor {i} has neighbours {sorted(unknown)} that are neither surviving nor dropped"
            )


def _unmask_seeds(
    survivors: set[int],
    dropped: set[int],
    self_seeds_of_survivors: Mapping[int, bytes],
    pair_seeds_of_dropped: Mapping[int, Mapping[int, bytes]],
    graph: Graph,
) -> tuple[list[bytes], list[bytes]]:
    """The seeds whose masks the unmasked sum adds back (plus) and removes (minus)."""
    # Subtract every survivor's self mask.
    minus = [self_seeds_of_survivors[i] for i in sorted(survivors)]
    plus: list[bytes] = []
    # Survivor i added sgn(i, d) * PRG(s_id) for each dropped neighbour d: subtract it, i.e.
    # subtract when i < d and add back when i > d.
    for d in sorted(dropped):
        seeds = pair_seeds_of_dropped.get(d, {})
        for i in sorted(set(graph[d]) & survivors):
            if i not in seeds:
                raise ValueError(f"missing reconstructed pairwise seed between dropped {d} and survivor {i}")
            (minus if i < d else plus).append(seeds[i])
    return plus, minus
