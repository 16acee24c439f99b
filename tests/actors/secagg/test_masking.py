"""Masking on clients and unmasking on the server, with and without dropouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.graph import complete_graph, harary_graph
from fedmeta.actors.secagg.keys import (
    draw_private_bytes,
    keypair_from_bytes,
    pair_info,
    shared_seed,
)
from fedmeta.actors.secagg.masking import mask_vector, pairwise_mask_sum, unmask_sum
from fedmeta.actors.secagg.prg import expand_mask
from fedmeta.actors.secagg.quantize import bits_needed, dequantize, quantize, sub_mod, sum_mod


def _setup(num_clients: int, graph: list[set[int]], rng: np.random.Generator, round_id: int = 0):
    """Per-client self seeds and X25519-agreed pairwise seeds {i: {j: s_ij}} along the graph."""
    pairs = [keypair_from_bytes(draw_private_bytes(rng)) for _ in range(num_clients)]
    self_seeds = {i: rng.bytes(32) for i in range(num_clients)}
    pair_seeds = {
        i: {j: shared_seed(pairs[i][0], pairs[j][1], pair_info(b"mask", round_id, i, j)) for j in graph[i]}
        for i in range(num_clients)
    }
    return self_seeds, pair_seeds


@pytest.mark.parametrize("num_clients,k", [(2, 1), (6, 5), (12, 4), (13, 6), (20, 3)])
def test_pairwise_masks_cancel_over_all_clients(num_clients, k):
    rng = np.random.default_rng(num_clients * 100 + k)
    g = harary_graph(num_clients, k, rng)
    self_seeds, pair_seeds = _setup(num_clients, g, rng)
    n, bits = 257, 33
    total = sum_mod([pairwise_mask_sum(i, g[i], pair_seeds[i], n, bits) for i in range(num_clients)], bits)
    assert not total.any()
    # Masked vectors sum to sum(q) + sum of self masks.
    q = rng.integers(0, 2**bits, size=(num_clients, n), dtype=np.uint64)
    ys = [mask_vector(q[i], self_seeds[i], i, g[i], pair_seeds[i], bits) for i in range(num_clients)]
    selfs = sum_mod([expand_mask(self_seeds[i], n, bits) for i in range(num_clients)], bits)
    np.testing.assert_array_equal(sub_mod(sum_mod(ys, bits), selfs, bits), sum_mod(q, bits))


@settings(max_examples=40, deadline=None)
@given(
    num_clients=st.integers(2, 14),
    data=st.data(),
    bits=st.integers(1, 62),
    seed=st.integers(0, 2**32 - 1),
)
def test_unmask_sum_with_dropouts_equals_survivors_plain_sum(num_clients, data, bits, seed):
    # Degrees for which a k-regular graph exists (odd k needs an even client count).
    valid = [
        k for k in range(1, num_clients + 1) if k % 2 == 0 or num_clients % 2 == 0 or k >= num_clients - 1
    ]
    k = data.draw(st.sampled_from(valid))
    survivors = data.draw(st.sets(st.integers(0, num_clients - 1), min_size=1), label="survivors")
    dropped = set(range(num_clients)) - survivors
    rng = np.random.default_rng(seed)
    g = harary_graph(num_clients, k, rng)
    self_seeds, pair_seeds = _setup(num_clients, g, rng, round_id=seed % 7)
    n = 37
    q = rng.integers(0, 2**bits, size=(num_clients, n), dtype=np.uint64)  # (clients, n)
    ys = {i: mask_vector(q[i], self_seeds[i], i, g[i], pair_seeds[i], bits) for i in survivors}
    masked_sum = sum_mod([ys[i] for i in sorted(survivors)], bits)
    # What the server reconstructs: b_i of survivors, and for each dropped d (from s_d^SK and the
    # survivors' public keys) the seeds s_di of d's surviving neighbours.
    recovered = {d: {i: pair_seeds[d][i] for i in g[d] & survivors} for d in dropped}
    out = unmask_sum(
        masked_sum, survivors, dropped, {i: self_seeds[i] for i in survivors}, recovered, g, n, bits
    )
    np.testing.assert_array_equal(out, sum_mod(q[sorted(survivors)], bits))


def test_single_masked_vector_looks_uniform(chi2_pvalue):
    rng = np.random.default_rng(11)
    num_clients, k, n, bits = 10, 4, 100_000, 24
    g = harary_graph(num_clients, k, rng)
    self_seeds, pair_seeds = _setup(num_clients, g, rng)
    # A very non-uniform input: a smooth, small-magnitude quantized update.
    x = np.sin(np.linspace(0, 20, n)) * 0.01
    q = quantize(x, 1.0, 1e-4, bits, rng)

    def top(v):  # top 8 bits -> 256 buckets
        return (v >> np.uint64(bits - 8)).astype(np.int64)

    assert chi2_pvalue(top(q), 256) < 1e-12  # the input itself is far from uniform
    y = mask_vector(q, self_seeds[3], 3, g[3], pair_seeds[3], bits)
    assert chi2_pvalue(top(y), 256) > 1e-3
    assert chi2_pvalue((y & np.uint64(0xFF)).astype(np.int64), 256) > 1e-3


def test_end_to_end_float_sum_with_quantization():
    rng = np.random.default_rng(4)
    num_clients, n, clip, step = 16, 500, 1.0, 1e-5
    bits = bits_needed(num_clients, clip, step)
    g = harary_graph(num_clients, 6, rng)
    self_seeds, pair_seeds = _setup(num_clients, g, rng)
    x = rng.normal(0, 0.5, size=(num_clients, n))
    dropped = {2, 9}
    survivors = set(range(num_clients)) - dropped
    ys = [
        mask_vector(quantize(x[i], clip, step, bits, rng), self_seeds[i], i, g[i], pair_seeds[i], bits)
        for i in sorted(survivors)
    ]
    recovered = {d: {i: pair_seeds[d][i] for i in g[d] & survivors} for d in dropped}
    plain = unmask_sum(
        sum_mod(ys, bits), survivors, dropped, {i: self_seeds[i] for i in survivors}, recovered, g, n, bits
    )
    expected = np.clip(x[sorted(survivors)], -clip, clip).sum(axis=0)
    assert np.max(np.abs(dequantize(plain, step, bits) - expected)) <= len(survivors) * step


def test_complete_graph_matches_original_secagg():
    rng = np.random.default_rng(8)
    g = complete_graph(5)
    self_seeds, pair_seeds = _setup(5, g, rng)
    q = rng.integers(0, 2**20, size=(5, 9), dtype=np.uint64)
    ys = [mask_vector(q[i], self_seeds[i], i, g[i], pair_seeds[i], 20) for i in (0, 1, 3)]
    recovered = {d: {i: pair_seeds[d][i] for i in (0, 1, 3)} for d in (2, 4)}
    out = unmask_sum(
        sum_mod(ys, 20), {0, 1, 3}, {2, 4}, {i: self_seeds[i] for i in (0, 1, 3)}, recovered, g, 9, 20
    )
    np.testing.assert_array_equal(out, sum_mod(q[[0, 1, 3]], 20))


def test_inconsistent_inputs_are_refused():
    rng = np.random.default_rng(9)
    g = complete_graph(4)
    self_seeds, pair_seeds = _setup(4, g, rng)
    z = np.zeros(5, dtype=np.uint64)
    with pytest.raises(ValueError, match="no pairwise seed"):
        mask_vector(z, self_seeds[0], 0, g[0], {1: pair_seeds[0][1]}, 16)
    with pytest.raises(ValueError, match="itself"):
        pairwise_mask_sum(0, {0, 1}, pair_seeds[0], 5, 16)
    survivors, dropped = {0, 1, 2}, {3}
    good_self = {i: self_seeds[i] for i in survivors}
    good_pairs = {3: {i: pair_seeds[3][i] for i in survivors}}
    with pytest.raises(ValueError, match="never be revealed"):  # self seed of a dropped client
        unmask_sum(z, survivors, dropped, {**good_self, 3: self_seeds[3]}, good_pairs, g, 5, 16)
    with pytest.raises(ValueError, match="missing reconstructed"):
        unmask_sum(z, survivors, dropped, good_self, {3: {0: pair_seeds[3][0]}}, g, 5, 16)
    with pytest.raises(ValueError, match="neither surviving nor dropped"):
        unmask_sum(z, survivors, set(), good_self, {}, g, 5, 16)
    with pytest.raises(ValueError, match="both surviving and dropped"):
        unmask_sum(z, survivors, {0, 3}, good_self, good_pairs, g, 5, 16)
    with pytest.raises(ValueError, match="shape"):
        unmask_sum(z[:4], survivors, dropped, good_self, good_pairs, g, 5, 16)
