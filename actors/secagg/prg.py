"""Pseudorandom generator expanding a 32-byte seed into a mask vector in Z_{2^b}.

In Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning", section 4) every mask -- a client's self mask PRG(b_u) and each pairwise mask
PRG(s_uv) -- is the output of a cryptographic PRG on a short seed, so that only seeds (not
vectors) need to be secret-shared and recovered. Bell et al. 2020 (SecAgg+) keeps the same PRG.

We use ChaCha20 (RFC 7539 stream cipher, via `cryptography`) keyed by the seed with a fixed
all-zero nonce/counter, encrypting zeros: the keystream *is* the PRG output. A fixed nonce is
safe because each seed keys exactly one mask; the callers derive seeds with HKDF over
per-round, per-pair `info`, so no two masks share a key.

The keystream is read as little-endian words (uint32 for b <= 32, else uint64) and reduced mod 2^b
by masking the low b bits; since 2^b divides the word's range the result is exactly uniform in
Z_{2^b}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedmeta.actors.secagg.quantize import MAX_BITS

SEED_BYTES = 32
# ChaCha20 in `cryptography` takes a 16-byte nonce (32-bit counter || 96-bit nonce); all zeros.
_NONCE = bytes(16)


def _check(seed: bytes, n: int, bits: int) -> None:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    if n < 0:
        raise ValueError(f"mask length must be >= 0, got {n}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")


def expand_mask(seed: bytes, n: int, bits: int) -> np.ndarray:
    """n uniform elements of Z_{2^bits} from a 32-byte seed, as a uint64 array of shape (n,)."""
    return expand_masks([seed], n, bits)[0]


def expand_masks(seeds: Sequence[bytes], n: int, bits: int, native: bool = False) -> np.ndarray:
    """Masks for several seeds at once: uint64 array of shape (len(seeds), n).

    `native=True` returns the keystream words as they are (uint32 when bits <= 32), reduced mod
    2^bits, without widening: summing them in uint32 wraps mod 2^32, which 2^bits divides.

    One ChaCha20 call per seed writes its keystream directly into its row of a single output
    buffer (no per-seed allocation or copy), then one vectorized reduction mod 2^bits.
    """
    for s in seeds:
        _check(s, n, bits)
    # 32-bit keystream words suffice for b <= 32 (2^b divides 2^32, still exactly uniform) and
    # halve the cipher work, the hot path of secure aggregation
    word = 4 if bits <= 32 else 8
    row_bytes = word * n
    # `update_into` may demand len(out) >= len(in) + block_size - 1 (64-byte ChaCha blocks), so
    # the flat buffer carries 64 bytes of slack after the last row; rows stay contiguous.
    flat = np.empty(len(seeds) * row_bytes + 64, dtype=np.uint8)
    zeros = bytes(row_bytes)
    view = memoryview(flat)
    for row, s in enumerate(seeds):
        enc = Cipher(algorithms.ChaCha20(bytes(s), _NONCE), mode=None).encryptor()
        enc.update_into(zeros, view[row * row_bytes :])
    masks = flat[: len(seeds) * row_bytes].view("<u4" if word == 4 else "<u8")
    if not native:
        masks = masks.astype(np.uint64, copy=False)
    masks = masks.reshape(len(seeds), n)  # (seeds, n)
    masks &= masks.dtype.type((1 << bits) - 1)
    return masks
