"""Shamir t-of-n sharing over GF(2^521 - 1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    reconstruct,
    share_from_bytes,
    share_to_bytes,
    split,
)


def test_prime_is_the_mersenne_prime_521_and_fits_secrets():
    assert PRIME == 2**521 - 1
    assert PRIME > 2 ** (8 * 65)  # 0x01 || 64-byte secret is a field element
    # Fermat test with a few bases (the primality of M521 is classical; this guards typos).
    assert all(pow(a, PRIME - 1, PRIME) == 1 for a in (2, 3, 5, 7, 11))


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=0, max_size=64),
    n=st.integers(1, 9),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_t_shares_reconstruct(secret, n, data, seed):
    t = data.draw(st.integers(1, n))
    shares = split(secret, n, t, np.random.default_rng(seed))
    assert len(shares) == n and len({x for x, _ in shares}) == n
    k = data.draw(st.integers(t, n), label="shares used")
    subset = data.draw(st.permutations(shares))[:k]
    assert reconstruct(subset, t) == secret
    # Serialization round trip, as sent inside encrypted messages.
    blobs = [share_to_bytes(s) for s in subset]
    assert all(len(b) == SHARE_BYTES for b in blobs)
    assert [share_from_bytes(b) for b in blobs] == subset
    assert reconstruct([share_from_bytes(b) for b in blobs], t) == secret


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(2, 9),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fewer_than_t_shares_do_not_reveal_the_secret(secret, n, data, seed):
    t = data.draw(st.integers(2, n))
    shares = data.draw(st.permutations(split(secret, n, t, np.random.default_rng(seed))))
    with pytest.raises(ValueError, match="at least"):
        reconstruct(shares[: t - 1], t)
    # Interpolating t-1 shares as if the threshold were t-1 yields garbage, not the secret: a
    # degree-(t-2) polynomial through them has another constant term (or the bytes do not decode).
    try:
        guess = reconstruct(shares[: t - 1], t - 1)
    except ValueError as e:  # the interpolated constant is not a 32-byte secret
        assert "at least" not in str(e) and "threshold" not in str(e)
    else:
        assert guess != secret


def test_t_minus_one_shares_are_consistent_with_any_secret():
    # Perfect secrecy: for t-1 fixed shares and any candidate secret, a degree t-1 polynomial
    # through them exists; it reconstructs to the candidate together with the t-1 shares.
    t = 3
    shares = split(b"\x07" * 32, 5, t, np.random.default_rng(0))[:2]
    for candidate in (b"\x00" * 32, b"\xff" * 32, b"other secret"):
        # Evaluation of the polynomial through (0, enc(candidate)) and the 2 shares at x = 9.
        enc = int.from_bytes(b"\x01" + candidate, "big")
        pts = [(0, enc)] + shares
        y9 = 0
        for i, (xi, yi) in enumerate(pts):
            num = den = 1
            for j, (xj, _) in enumerate(pts):
                if j != i:
                    num, den = num * (9 - xj) % PRIME, den * (xi - xj) % PRIME
            y9 = (y9 + yi * num * pow(den, -1, PRIME)) % PRIME
        assert reconstruct(shares + [(9, y9)], t) == candidate


def test_custom_evaluation_points_and_determinism():
    xs = [101, 7, 55, 2**40]
    a = split(b"seed" * 8, 4, 2, np.random.default_rng(3), xs=xs)
    assert [x for x, _ in a] == xs
    assert a == split(b"seed" * 8, 4, 2, np.random.default_rng(3), xs=xs)
    assert reconstruct([a[3], a[1]], 2) == b"seed" * 8


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="t <= n"):
        split(b"s", 3, 4, rng)
    with pytest.raises(ValueError, match="t <= n"):
        split(b"s", 3, 0, rng)
    with pytest.raises(ValueError, match="distinct"):
        split(b"s", 3, 2, rng, xs=[1, 2, 2])
    with pytest.raises(ValueError, match="1, p - 1"):
        split(b"s", 2, 2, rng, xs=[0, 1])
    with pytest.raises(ValueError, match="at most 64"):
        split(bytes(65), 3, 2, rng)
    shares = split(b"s", 3, 2, rng)
    with pytest.raises(ValueError, match="duplicate"):
        reconstruct([shares[0], shares[0]], 2)
    with pytest.raises(ValueError):
        share_from_bytes(b"\x00" * 10)
