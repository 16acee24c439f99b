"""Fixed-point encoding of model updates into the ring Z_{2^b} for masked secure aggregation.

Masked secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", section 4; Bell et al. 2020, SecAgg+) works on vectors of
integers modulo R = 2^b: the masks are uniform in Z_R and cancel in the sum only under modular
arithmetic. Float updates are therefore

1. clipped per coordinate to [-clip, clip] (the L2 clipping of the whole update, if any, happens
   earlier and elsewhere; this per-coordinate clip is what makes the overflow bound below hold),
2. stochastically rounded to an integer multiple of `step` (unbiased: E[dequantize(quantize(x))]
   equals the clipped x), and
3. stored as the signed integer taken mod 2^b (two's complement style) in a uint64 array.

The modulus must be large enough that the *sum* over all clients of the signed integers stays in
[-2^(b-1), 2^(b-1) - 1]; then the sum mod 2^b decodes to the true sum. `bits_needed` picks the
smallest such b and `check_no_overflow` refuses configurations that would need more than
`MAX_BITS` bits.

Bits are restricted to 1..62 (`MAX_BITS`): every element is < 2^62, so decoding to int64 and
multiplying the bound by the number of clients never overflows a machine word. The modular
helpers rely on numpy's uint64 arithmetic wrapping mod 2^64, which is exact mod 2^b because 2^b
divides 2^64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# Largest modulus exponent supported (see module docstring for why not 64).
MAX_BITS = 62

# Above 2^52 integer multiples of `step` are no longer exact in float64, which would bias the
# stochastic rounding; refuse such a fine step instead.
_MAX_LEVELS = 2**52


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << int(bits)) - 1)


def max_level(clip: float, step: float) -> int:
    """Largest |integer| a single clipped coordinate can round to: ceil(clip / step)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    levels = clip / step
    if levels > _MAX_LEVELS:
        raise ValueError(
            f"clip / step = {levels:.3g} exceeds 2^52: the quantization step is too fine to be "
            f"represented exactly in float64; increase the quantization step or lower clip"
        )
    # Stochastic rounding of v in [-clip/step, clip/step] gives floor(v) or ceil(v), so
    # |result| <= ceil(clip/step).
    return math.ceil(levels)


def bits_needed(num_clients: int, clip: float, step: float) -> int:
    """Smallest b such that the sum of `num_clients` quantized vectors cannot wrap mod 2^b.

    Each coordinate of one client's quantized vector is a signed integer in [-M, M] with
    M = ceil(clip / step), so the sum over N clients lies in [-N*M, N*M]. Two's complement in
    Z_{2^b} represents [-2^(b-1), 2^(b-1) - 1], hence we need N*M <= 2^(b-1) - 1, i.e.
    b = bit_length(N*M) + 1. The result may exceed MAX_BITS; `check_no_overflow` refuses that.
    """
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    bound = int(num_clients) * max_level(clip, step)
    return max(1, bound.bit_length() + 1)


def check_no_overflow(num_clients: int, clip: float, step: float, bits: int | None = None) -> int:
    """Validate a secure-aggregation quantization config and return the modulus bits to use.

    With `bits=None` returns `bits_needed(...)`; with explicit `bits`, checks it is enough.
    Raises ValueError naming the settings to change when the sum could wrap around or the
    modulus would need more than MAX_BITS bits.
    """
    need = bits_needed(num_clients, clip, step)
    if need > MAX_BITS:
        raise ValueError(
            f"secure aggregation of {num_clients} clients with clip={clip} and "
            f"quantization step={step} needs a 2^{need} modulus, more than the supported "
            f"2^{MAX_BITS}: increase the quantization step, lower clip, or aggregate fewer "
            f"clients per round"
        )
    if bits is None:
        return need
    _check_bits(bits)
    if bits < need:
        raise ValueError(
            f"modulus bits={bits} can overflow: the sum of {num_clients} clients with "
            f"clip={clip} and quantization step={step} needs bits >= {need}; raise bits, "
            f"increase the quantization step, or lower clip"
        )
    return int(bits)


def quantize(
    x: np.ndarray, clip: float, step: float, bits: int, rng: np.random.Generator | np.ndarray
) -> np.ndarray:
    """Encode floats as elements of Z_{2^bits} (uint64), unbiasedly.

    Coordinates are clipped to [-clip, clip] (per coordinate), divided by `step`, and rounded
    up with probability equal to the fractional part (so the expectation is exact), then taken
    mod 2^bits. `rng` supplies the rounding coins: a Generator, or the uniforms in [0, 1)
    themselves, one per coordinate (e.g. `Secrets.uniform`).
    """
    _check_bits(bits)
    max_level(clip, step)  # validates clip and step
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise ValueError("quantize: input contains NaN or infinite values")
    # in place on one float64 copy (the hot path of a secure round): the same values as
    # clip(x) / step, floor, and the fractional part, without a temporary per step
    v = np.clip(x, -clip, clip, dtype=np.float64)
    v /= step
    lo = np.floor(v)
    v -= lo  # the fractional part
    coins = rng.random(v.shape) if isinstance(rng, np.random.Generator) else np.asarray(rng, dtype=np.float64)
    if coins.shape != v.shape:
        raise ValueError(f"quantize: {coins.shape} coins for an input of shape {v.shape}")
    up = coins < v  # P(up) = fractional part -> unbiased
    ints = lo.astype(np.int64)
    ints += up
    # Two's complement int64 bit pattern, truncated to b bits, is the value mod 2^b.
    return ints.view(np.uint64) & _mask(bits)


def dequantize(q: np.ndarray, step: float, bits: int) -> np.ndarray:
    """Decode elements of Z_{2^bits} (values >= 2^(bits-1) are negative) to floats times `step`.

    Works equally on the modular sum of several quantized vectors, as long as the true sum of
    their signed integers fits in [-2^(bits-1), 2^(bits-1) - 1] (see `bits_needed`).
    """
    _check_bits(bits)
    q = np.asarray(q, dtype=np.uint64) & _mask(bits)
    signed = q.astype(np.int64)
    signed[signed >= (1 << (bits - 1))] -= 1 << bits
    return signed.astype(np.float64) * step


def add_mod(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a + b) mod 2^bits on uint64 arrays (uint64 wraps mod 2^64, a multiple of 2^bits)."""
    _check_bits(bits)
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    return (a + b) & _mask(bits)


def sub_mod(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a - b) mod 2^bits on uint64 arrays (a negative difference wraps mod 2^64, then 2^bits)."""
    _check_bits(bits)
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    return (a - b) & _mask(bits)


def sum_mod(vectors: np.ndarray | Iterable[np.ndarray], bits: int) -> np.ndarray:
    """Sum of uint64 vectors mod 2^bits; `vectors` is (clients, n) or an iterable of (n,)."""
    _check_bits(bits)
    stacked = np.asarray(vectors if isinstance(vectors, np.ndarray) else list(vectors), dtype=np.uint64)
    if stacked.ndim == 1:
        raise ValueError("sum_mod expects a (clients, n) array or a sequence of vectors")
    return stacked.sum(axis=0, dtype=np.uint64) & _mask(bits)
