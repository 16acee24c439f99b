"""The SecAgg+ protocol's messages, errors and the checks both sides share (protocol.py has the
protocol itself: Bonawitz et al. 2017, Bell et al. 2020). Messages are immutable and hold only
ints, bytes, numpy arrays and containers of them, so they cross Ray as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmeta.actors.secagg import shamir
from fedmeta.actors.secagg.keys import (
    NONCE_BYTES,
)
from fedmeta.actors.secagg.quantize import MAX_BITS

MASK_PURPOSE = b"mask"
SHARE_PURPOSE = b"share"
PHASES = ("advertise", "share", "masked", "unmask")
_SHARE_BYTES = shamir.SHARE_BYTES


class SecAggAbort(RuntimeError):
    """The round cannot complete: too few clients or shares (below the threshold t) remain."""


class BelowSurvivorFloor(SecAggAbort):
    """Fewer clients survived than the neighbour graph was sized for: unmasking is refused."""


class ProtocolViolation(ValueError):
    """A message breaks the protocol (wrong phase, unknown sender, both shares revealed, ...)."""


# --------------------------------------------------------------------------------------------
# Messages (immutable; only ints, bytes, numpy arrays and containers of them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0: client's two X25519 public keys (raw 32 bytes each)."""

    client: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1: {neighbour: AES-GCM ciphertext of (share of b_sender || share of s_sender^SK)}."""

    sender: int
    shares: dict[int, bytes]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2: the masked vector y (uint64, values < 2^bits)."""

    client: int
    y: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> clients after round 2: who sent a masked input (survivors) and who shared keys
    but did not (dropped)."""

    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3: plaintext Shamir shares revealed by `client`: of b_i for surviving neighbours i
    (`self_shares`), of s_i^SK for dropped neighbours i (`key_shares`); never both for one i."""

    client: int
    self_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers shared by both sides
# --------------------------------------------------------------------------------------------


def _share_ad(round_id: int, sender: int, receiver: int) -> bytes:
    """AES-GCM associated data: binds a ciphertext to (round, sender, receiver), directed."""
    return b"fedmeta-secagg-share|%d|%d|%d" % (round_id, sender, receiver)


def _share_nonce(sender: int) -> bytes:
    """The key k_ij is shared by both directions; the sender id keeps the two nonces distinct."""
    return int(sender).to_bytes(NONCE_BYTES, "big")


def _check_id(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    if value >= 2**63:
        raise ValueError(f"{what} must be < 2^63, got {value!r}")
    return int(value)


def _check_bits_arg(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def _check_threshold(threshold, degree: int, allow_low_threshold: bool) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
        raise ValueError(f"threshold must be an integer, got {threshold!r}")  # noqa: TRY004
    t = int(threshold)
    if t < 1:
        raise ValueError(f"threshold t={t} must be >= 1")
    if t > degree:
        raise ValueError(
            f"threshold t={t} exceeds the number of neighbours k={degree} each client shares its "
            f"secrets with: they could never be reconstructed; use threshold <= {degree}"
        )
    if 2 * t <= degree and not allow_low_threshold:
        raise ValueError(
            f"threshold t={t} must be > k/2 = {degree / 2:g} (Bonawitz et al.): with t <= k/2 two "
            f"disjoint groups of neighbours could reveal both the self-mask seed and the mask key "
            f"of one client; pass allow_low_threshold=True to accept that risk"
        )
    return t
