"""Quantization into Z_{2^b}: accuracy, unbiasedness, overflow-free sums, modular helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmeta.actors.secagg.quantize import (
    MAX_BITS,
    add_mod,
    bits_needed,
    check_no_overflow,
    dequantize,
    quantize,
    sub_mod,
    sum_mod,
)

floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float64, st.integers(1, 40), elements=floats),
    clip=st.floats(0.01, 100.0),
    levels=st.integers(1, 2**20),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_within_one_step_of_clipped(x, clip, levels, seed):
    step = clip / levels
    bits = bits_needed(1, clip, step)
    q = quantize(x, clip, step, bits, np.random.default_rng(seed))
    assert q.dtype == np.uint64 and q.shape == x.shape
    assert np.all(q < 2**bits)
    err = np.abs(dequantize(q, step, bits) - np.clip(x, -clip, clip))
    assert np.all(err <= step * (1 + 1e-9))


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(7)
    step, clip, reps = 0.1, 1.0, 20_000
    x = np.concatenate([rng.uniform(-1.5, 1.5, 40), [0.05, -0.05, 0.999, -0.0001, 0.0]])
    bits = bits_needed(reps, clip, step)
    q = quantize(np.tile(x, (reps, 1)), clip, step, bits, rng)  # (reps, len(x))
    mean = dequantize(q, step, bits).mean(axis=0)
    # Each rounding has variance <= step^2 / 4, so the mean's standard error is <= step/(2 sqrt(reps)).
    se = step / (2 * np.sqrt(reps))
    assert np.all(np.abs(mean - np.clip(x, -clip, clip)) < 6 * se)
    # The modular sum of all repetitions decodes to the same mean (no wraparound at bits_needed).
    total = dequantize(sum_mod(q, bits), step, bits)
    np.testing.assert_allclose(total / reps, mean, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(
    num_clients=st.integers(1, 64),
    levels=st.integers(1, 5000),
    scale_exp=st.integers(-8, 8),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_modular_sum_decodes_exactly_without_overflow(num_clients, levels, scale_exp, n, seed):
    rng = np.random.default_rng(seed)
    step = 2.0**scale_exp
    clip = levels * step  # clip / step is an integer, so +-clip quantize to exactly +-levels
    bits = bits_needed(num_clients, clip, step)
    # Worst cases (all +clip, all -clip) plus random vectors beyond the clip range.
    xs = rng.uniform(-3 * clip, 3 * clip, size=(num_clients, n))
    xs[:, 0] = 5 * clip
    xs[:, -1] = -5 * clip
    q = quantize(xs, clip, step, bits, rng)  # (clients, n)
    ints = dequantize(q, 1.0, bits).astype(np.int64)  # each client's signed integers
    summed = dequantize(sum_mod(q, bits), 1.0, bits).astype(np.int64)
    np.testing.assert_array_equal(summed, ints.sum(axis=0))
    np.testing.assert_allclose(
        dequantize(sum_mod(q, bits), step, bits), dequantize(q, step, bits).sum(axis=0)
    )


@pytest.mark.parametrize("num_clients,levels", [(1, 1), (3, 7), (100, 1000), (1000, 2**20)])
def test_bits_needed_is_tight(num_clients, levels):
    step = 0.5
    clip = levels * step
    bits = bits_needed(num_clients, clip, step)
    x = np.full((num_clients, 3), clip)
    q = quantize(x, clip, step, bits, np.random.default_rng(0))
    assert dequantize(sum_mod(q, bits), step, bits)[0] == num_clients * clip
    if bits - 1 >= 1:
        # One bit fewer: the all-max sum wraps around into the negative half.
        smaller = bits - 1
        q_small = quantize(x, clip, step, smaller, np.random.default_rng(0))
        assert dequantize(sum_mod(q_small, smaller), step, smaller)[0] != num_clients * clip
        with pytest.raises(ValueError, match="bits"):
            check_no_overflow(num_clients, clip, step, bits=smaller)


def test_check_no_overflow_refuses_too_wide_config():
    with pytest.raises(ValueError, match=r"quantization step.*clip.*clients"):
        check_no_overflow(num_clients=10_000, clip=1e6, step=1e-9)
    assert check_no_overflow(100, 1.0, 1e-4) == bits_needed(100, 1.0, 1e-4) <= MAX_BITS
    assert check_no_overflow(100, 1.0, 1e-4, bits=MAX_BITS) == MAX_BITS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clients": 0, "clip": 1.0, "step": 0.1},
        {"num_clients": 2, "clip": -1.0, "step": 0.1},
        {"num_clients": 2, "clip": 1.0, "step": 0.0},
        {"num_clients": 2, "clip": 1.0, "step": 1e-20},
    ],
)
def test_bits_needed_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        bits_needed(**kwargs)


def test_quantize_rejects_nonfinite_and_bad_bits():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan]), 1.0, 0.1, 10, rng)
    for bits in (0, 63, 64):
        with pytest.raises(ValueError, match="bits"):
            quantize(np.zeros(2), 1.0, 0.1, bits, rng)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), bits=st.integers(1, MAX_BITS))
def test_add_sub_mod_match_python_ints(data, bits):
    mod = 1 << bits
    vals = st.lists(st.integers(0, mod - 1), min_size=1, max_size=8)
    a = data.draw(vals)
    b = data.draw(st.lists(st.integers(0, mod - 1), min_size=len(a), max_size=len(a)))
    A, B = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    assert add_mod(A, B, bits).tolist() == [(x + y) % mod for x, y in zip(a, b)]
    assert sub_mod(A, B, bits).tolist() == [(x - y) % mod for x, y in zip(a, b)]
    assert sub_mod(add_mod(A, B, bits), B, bits).tolist() == a
    assert sum_mod([A, B, A], bits).tolist() == [(2 * x + y) % mod for x, y in zip(a, b)]


def test_coins_can_be_given_as_uniforms_and_must_match_the_input():
    x = np.linspace(-1, 1, 11)
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(
        quantize(x, 1.0, 0.1, 12, np.random.default_rng(3)), quantize(x, 1.0, 0.1, 12, rng.random(11))
    )
    with pytest.raises(ValueError, match="coins"):
        quantize(x, 1.0, 0.1, 12, np.zeros(10))
