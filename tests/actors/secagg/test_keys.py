"""X25519 + HKDF seed agreement and AES-GCM share encryption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.keys import (
    ShareDecryptionError,
    decrypt_share,
    draw_private_bytes,
    encrypt_share,
    keypair_from_bytes,
    pair_info,
    shared_seed,
)


def _parties(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [keypair_from_bytes(draw_private_bytes(rng)) for _ in range(count)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), round_id=st.integers(0, 10**6))
def test_both_sides_derive_the_same_seed(seed, round_id):
    (sk_u, pk_u), (sk_v, pk_v) = _parties(seed, 2)
    info = pair_info(b"mask", round_id, 3, 9)
    s_uv = shared_seed(sk_u, pk_v, info)
    assert len(s_uv) == 32
    assert s_uv == shared_seed(sk_v, pk_u, pair_info(b"mask", round_id, 9, 3))


def test_different_pairs_purposes_and_rounds_differ():
    (sk0, _), (sk1, pk1), (_, pk2) = _parties(1, 3)
    info = pair_info(b"mask", 0, 0, 1)
    seeds = {
        shared_seed(sk0, pk1, info),
        shared_seed(sk0, pk2, info),
        shared_seed(sk1, pk2, info),
        shared_seed(sk0, pk1, pair_info(b"share-key", 0, 0, 1)),
        shared_seed(sk0, pk1, pair_info(b"mask", 1, 0, 1)),
    }
    assert len(seeds) == 5


def test_keypair_is_deterministic_and_draws_are_reproducible():
    b = draw_private_bytes(np.random.default_rng(5))
    assert b == draw_private_bytes(np.random.default_rng(5)) and len(b) == 32
    assert keypair_from_bytes(b)[1] == keypair_from_bytes(b)[1]
    assert keypair_from_bytes(b)[1] != keypair_from_bytes(bytes(32))[1]
    with pytest.raises(ValueError, match="32 bytes"):
        keypair_from_bytes(b[:31])


def test_low_order_public_key_is_refused():
    sk, _ = _parties(2, 1)[0]
    with pytest.raises(ValueError, match="public key"):
        shared_seed(sk, bytes(32), b"info")  # the all-zero point has order 1


KEY = bytes(range(32))
NONCE = bytes(12)
AD = b"from=3|to=9|round=4"


@settings(max_examples=30, deadline=None)
@given(plaintext=st.binary(max_size=200))
def test_aes_gcm_round_trip(plaintext):
    ct = encrypt_share(KEY, plaintext, AD, NONCE)
    assert len(ct) == len(plaintext) + 16
    assert decrypt_share(KEY, ct, AD, NONCE) == plaintext


@settings(max_examples=40, deadline=None)
@given(plaintext=st.binary(min_size=1, max_size=80), data=st.data())
def test_flipped_byte_is_detected(plaintext, data):
    ct = encrypt_share(KEY, plaintext, AD, NONCE)
    pos = data.draw(st.integers(0, len(ct) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(ct)
    bad[pos] ^= 1 << bit
    with pytest.raises(ShareDecryptionError):
        decrypt_share(KEY, bytes(bad), AD, NONCE)
    bad_ad = bytearray(AD)
    bad_ad[data.draw(st.integers(0, len(AD) - 1))] ^= 1 << bit
    with pytest.raises(ShareDecryptionError, match="associated data"):
        decrypt_share(KEY, ct, bytes(bad_ad), NONCE)


def test_wrong_key_or_nonce_is_detected_and_error_is_a_value_error():
    ct = encrypt_share(KEY, b"share", AD, NONCE)
    with pytest.raises(ShareDecryptionError):
        decrypt_share(bytes(32), ct, AD, NONCE)
    with pytest.raises(ValueError):  # ShareDecryptionError subclasses ValueError
        decrypt_share(KEY, ct, AD, b"\x01" * 12)
    with pytest.raises(ValueError, match="nonce"):
        encrypt_share(KEY, b"x", AD, bytes(8))
    with pytest.raises(ValueError, match="key"):
        encrypt_share(KEY[:16], b"x", AD, NONCE)
