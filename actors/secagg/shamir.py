"""t-of-n Shamir secret sharing of short byte strings (seeds and private keys).

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
section 3) has each client Shamir-share its self-mask seed b_u and its mask private key s_u^SK,
so the server can recover b_u for clients that finished and s_u^SK for clients that dropped;
Bell et al. 2020 (SecAgg+) shares them only among a client's graph neighbours.

Field: GF(p) with the Mersenne prime p = 2^521 - 1 (a well-known prime, the one behind NIST
P-521). It exceeds 2^513, so a secret of up to 64 bytes, encoded with a leading 0x01 byte
(to keep leading zero bytes of the secret), is a field element; 32-byte seeds and X25519 keys
fit with a wide margin. Python ints give exact arithmetic; speed is irrelevant at these sizes.

Polynomial coefficients are uniform in GF(p), drawn from a numpy Generator via bytes with
rejection sampling -- fine for simulation; a deployment would draw them from os.urandom.
Any t shares determine the secret (Lagrange interpolation at 0); any t-1 shares are
consistent with every secret, so they reveal nothing.
"""

from __future__ import annotations

import numpy as np

PRIME = 2**521 - 1
_PRIME_BITS = 521
_Y_BYTES = (_PRIME_BITS + 7) // 8  # 66 bytes hold any field element
_X_BYTES = 8
SHARE_BYTES = _X_BYTES + _Y_BYTES
MAX_SECRET_BYTES = 64  # 0x01 || secret must stay below p


def _encode(secret: bytes) -> int:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError("secret must be bytes")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret is {len(secret)} bytes; at most {MAX_SECRET_BYTES} are supported")
    return int.from_bytes(b"\x01" + bytes(secret), "big")


def _decode(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) - 1 > MAX_SECRET_BYTES:
        raise ValueError("shares are inconsistent: the interpolated value is not an encoded secret")
    return raw[1:]


def _uniform_field_element(rng: np.random.Generator) -> int:
    # Top 521 bits of 66 random bytes are uniform in [0, 2^521 - 1]; rejecting 2^521 - 1 = p
    # itself leaves exactly uniform [0, p) (rejection probability 2^-521).
    while True:
        v = int.from_bytes(rng.bytes(_Y_BYTES), "big") >> (8 * _Y_BYTES - _PRIME_BITS)
        if v < PRIME:
            return v


def split(
    secret: bytes, n: int, t: int, rng: np.random.Generator, xs: list[int] | None = None
) -> list[tuple[int, int]]:
    """Split `secret` into n shares (x, y) such that any t of them reconstruct it.

    `xs` are the evaluation points (default 1..n), e.g. 1 + the recipients' client ids; they
    must be distinct and nonzero mod p (x = 0 would be the secret itself).
    """
    if not (isinstance(n, int) and isinstance(t, int) and 1 <= t <= n):
        raise ValueError(f"need integers 1 <= t <= n, got t={t!r}, n={n!r}")
    if xs is None:
        xs = list(range(1, n + 1))
    xs = [int(x) for x in xs]
    if len(xs) != n:
        raise ValueError(f"got {len(xs)} evaluation points for n={n} shares")
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("evaluation points must lie in [1, p - 1]; 0 would reveal the secret")
    if len(set(xs)) != n:
        raise ValueError("evaluation points must be distinct")
    # f(x) = secret + c_1 x + ... + c_{t-1} x^{t-1}
    coeffs = [_encode(secret)] + [_uniform_field_element(rng) for _ in range(t - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def reconstruct(shares: list[tuple[int, int]], t: int) -> bytes:
    """Recover the secret from at least t shares by Lagrange interpolation at x = 0.

    Uses the first t shares. Raises ValueError for fewer than t shares, duplicate x, or a
    result that does not decode (shares from different secrets, or too low a t).
    """
    if t < 1:
        raise ValueError(f"threshold t must be >= 1, got {t}")
    if len(shares) < t:
        raise ValueError(f"need at least t={t} shares to reconstruct, got {len(shares)}")
    xs = [int(x) % PRIME for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share x-coordinates")
    if 0 in xs:
        raise ValueError("share x-coordinate 0 is not allowed")
    used = [(int(x) % PRIME, int(y) % PRIME) for x, y in shares[:t]]
    secret = 0
    for i, (xi, yi) in enumerate(used):
        # Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i)
        num, den = 1, 1
        for j, (xj, _) in enumerate(used):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return _decode(secret)


def share_to_bytes(share: tuple[int, int]) -> bytes:
    """Fixed-size encoding: 8-byte big-endian x || 66-byte big-endian y (74 bytes)."""
    x, y = share
    if not 0 < x < 2 ** (8 * _X_BYTES) or not 0 <= y < PRIME:
        raise ValueError("share out of range")
    return int(x).to_bytes(_X_BYTES, "big") + int(y).to_bytes(_Y_BYTES, "big")


def share_from_bytes(data: bytes) -> tuple[int, int]:
    """Inverse of `share_to_bytes`."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a serialized share is {SHARE_BYTES} bytes, got {len(data)}")
    x = int.from_bytes(data[:_X_BYTES], "big")
    y = int.from_bytes(data[_X_BYTES:], "big")
    if x == 0 or y >= PRIME:
        raise ValueError("serialized share out of range")
    return x, y
