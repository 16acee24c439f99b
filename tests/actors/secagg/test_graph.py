"""Harary neighbour graphs (SecAgg+) and the complete graph (SecAgg)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.graph import complete_graph, harary_graph


def _check_simple_symmetric(g: list[set[int]], n: int) -> None:
    assert len(g) == n
    for i, nbrs in enumerate(g):
        assert i not in nbrs
        assert all(0 <= j < n and i in g[j] for j in nbrs)


def _connected(g: list[set[int]]) -> bool:
    seen, todo = {0}, [0]
    while todo:
        for j in g[todo.pop()] - seen:
            seen.add(j)
            todo.append(j)
    return len(seen) == len(g)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 60), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_harary_graph_is_k_regular_symmetric_and_connected(n, data, seed):
    k = data.draw(st.integers(1, n + 2))
    rng = np.random.default_rng(seed)
    if k < n - 1 and k % 2 == 1 and n % 2 == 1:
        with pytest.raises(ValueError, match="even"):
            harary_graph(n, k, rng)
        return
    g = harary_graph(n, k, rng)
    _check_simple_symmetric(g, n)
    degree = min(k, n - 1)
    assert all(len(nbrs) == degree for nbrs in g)
    if k >= n - 1:
        assert g == complete_graph(n)
    if n > 1 and (k >= 2 or n == 2):
        # H_{k,n} is k-connected for k >= 2; k = 1 is a perfect matching.
        assert _connected(g)


def test_neighbours_depend_on_the_seed_only():
    a = harary_graph(50, 6, np.random.default_rng(0))
    assert a == harary_graph(50, 6, np.random.default_rng(0))
    assert a != harary_graph(50, 6, np.random.default_rng(1))
    # Random placement: neighbours are not simply the nearby ids.
    ring_like = sum(all(abs(i - j) in (1, 2, 3, 47, 48, 49) for j in a[i]) for i in range(50))
    assert ring_like < 5


def test_complete_graph():
    g = complete_graph(4)
    assert g == [{1, 2, 3}, {0, 2, 3}, {0, 1, 3}, {0, 1, 2}]
    assert complete_graph(1) == [set()]


@pytest.mark.parametrize("n,k", [(0, 2), (5, 0), (5, -1), (-3, 2)])
def test_bad_sizes_are_refused(n, k):
    with pytest.raises(ValueError):
        harary_graph(n, k, np.random.default_rng(0))
