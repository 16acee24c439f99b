"""ChaCha20 mask expansion: determinism, range, uniformity, batching, speed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.prg import expand_mask, expand_masks

seeds = st.binary(min_size=32, max_size=32)


def test_matches_chacha20_known_answer():
    # RFC 8439 appendix A.1 test vector #1: key = 0^32, nonce = 0, counter = 0.
    first_word = int.from_bytes(bytes.fromhex("76b8e0ada0f13d90"), "little")
    assert int(expand_mask(bytes(32), 1, 62)[0]) == first_word & (2**62 - 1)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, other=seeds, n=st.integers(0, 300), bits=st.integers(1, 62))
def test_deterministic_in_range_and_seed_dependent(seed, other, n, bits):
    a = expand_mask(seed, n, bits)
    assert a.dtype == np.uint64 and a.shape == (n,)
    np.testing.assert_array_equal(a, expand_mask(seed, n, bits))
    assert np.all(a < np.uint64(2**bits))
    # A shorter mask is a prefix of a longer one (same keystream), and bits only truncate
    # (within one word size: b <= 32 reads 32-bit keystream words, larger b 64-bit ones).
    np.testing.assert_array_equal(expand_mask(seed, n + 5, bits)[:n], a)
    widest = 32 if bits <= 32 else 62
    np.testing.assert_array_equal(expand_mask(seed, n, widest) & np.uint64(2**bits - 1), a)
    if other != seed and n >= 4 and bits >= 16:
        assert not np.array_equal(expand_mask(other, n, bits), a)


@settings(max_examples=20, deadline=None)
@given(batch=st.lists(seeds, min_size=0, max_size=6), n=st.integers(0, 200), bits=st.integers(1, 62))
def test_expand_masks_rows_equal_single_expansions(batch, n, bits):
    out = expand_masks(batch, n, bits)
    assert out.shape == (len(batch), n) and out.dtype == np.uint64
    for row, s in zip(out, batch):
        np.testing.assert_array_equal(row, expand_mask(s, n, bits))


@pytest.mark.parametrize("bits", [8, 20, 40, 62])
def test_top_bits_are_uniform(bits, chi2_pvalue):
    mask = expand_mask(bytes(range(32)), 100_000, bits)
    top = (mask >> np.uint64(bits - 8)).astype(np.int64)  # top 8 bits -> 256 buckets
    assert chi2_pvalue(top, 256) > 1e-3
    low = (mask & np.uint64(0xFF)).astype(np.int64)
    assert chi2_pvalue(low, 256) > 1e-3


def test_chi2_has_power_against_bias(chi2_pvalue):
    # Sanity check of the test itself: a mildly skewed distribution is rejected.
    rng = np.random.default_rng(0)
    skewed = np.minimum(rng.integers(0, 256, 100_000), rng.integers(0, 300, 100_000)) % 256
    assert chi2_pvalue(skewed, 256) < 1e-6


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(b"short", 10, 8)
    with pytest.raises(ValueError, match="bits"):
        expand_mask(bytes(32), 10, 63)
    with pytest.raises(ValueError, match="length"):
        expand_mask(bytes(32), -1, 8)
