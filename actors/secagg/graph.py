"""Neighbour graphs for masked secure aggregation.

Original SecAgg (Bonawitz et al. 2017) masks every pair of clients: the complete graph, O(n)
masks and shares per client. SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", section 3) replaces it with a sparse random k-regular graph,
k = O(log n), built as a Harary graph H_{k,n} over a random permutation of the clients: clients
sit on a ring in random order and each is linked to its k/2 nearest ring neighbours on either
side. Random placement is what gives the security and dropout-robustness guarantees; the ring
structure makes it k-regular and k-connected.

Odd k: H_{k,n} adds the diametric chord (ring position i to i + n/2), which is k-regular only
for even n. A k-regular graph on an odd number of nodes with odd k cannot exist (the degree sum
n*k would be odd), so that combination is refused. k >= n - 1 gives the complete graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def complete_graph(n: int) -> list[set[int]]:
    """Neighbour sets of the complete graph on nodes 0..n-1 (the original SecAgg)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of nodes must be a positive integer, got {n!r}")
    return [set(range(n)) - {i} for i in range(n)]


def _check_degree(n: int, k: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"degree k must be a positive integer, got {k!r}")
    if k < n - 1 and k % 2 == 1 and n % 2 == 1:
        raise ValueError(
            f"no {k}-regular graph exists on {n} nodes (odd degree needs an even node count); use an even k"
        )


def harary_graph(n: int, k: int, rng: np.random.Generator) -> list[set[int]]:
    """Neighbour sets of a random k-regular Harary graph on nodes 0..n-1.

    Result[i] is the set of neighbours of node i; symmetric, no self loops, every set has k
    elements (n - 1 when k >= n - 1: complete graph). `rng` draws the ring placement.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of nodes must be a positive integer, got {n!r}")
    _check_degree(n, k)
    if k >= n - 1:
        return complete_graph(n)
    return harary_from_ring(rng.permutation(n), k)


def harary_from_ring(ring: Sequence[int], k: int) -> list[set[int]]:
    """The Harary graph H_{k,n} for a given ring placement: ring[p] is the node at position p.

    The server may draw the placement before the graph is needed (`SecAggServer.placement`), so
    a simulator can host ring-adjacent clients together; the graph is the same either way.
    """
    n = len(ring)
    if n < 1 or sorted(int(u) for u in ring) != list(range(n)):
        raise ValueError("ring must be a permutation of 0..n-1")
    _check_degree(n, k)
    if k >= n - 1:
        return complete_graph(n)
    graph: list[set[int]] = [set() for _ in range(n)]
    offsets = list(range(1, k // 2 + 1))
    if k % 2 == 1:
        offsets.append(n // 2)  # diametric chord; k < n - 1 keeps it distinct from ring links
    for p in range(n):
        u = int(ring[p])
        for d in offsets:
            v = int(ring[(p + d) % n])
            graph[u].add(v)
            graph[v].add(u)
    return graph
