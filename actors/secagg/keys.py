"""Key agreement and authenticated encryption for masked secure aggregation.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
section 4 / figure 4) gives every client two Diffie-Hellman key pairs per round:
- (c_u^PK, c_u^SK): pairwise agreement yields the symmetric key under which u sends its Shamir
  shares to v through the server (authenticated encryption, so the server can neither read nor
  alter them);
- (s_u^PK, s_u^SK): pairwise agreement yields the seed s_uv of the pairwise mask PRG(s_uv).
Bell et al. 2020 (SecAgg+) runs the same agreements, only with graph neighbours.

Here: X25519 for the agreement, HKDF-SHA256 to turn the raw shared secret into a 32-byte seed
or key (with an `info` string for domain separation: round, pair, purpose), and AES-256-GCM for
the shares. All primitives come from the `cryptography` package.

Private keys are built from explicit bytes so simulations are reproducible;
`draw_private_bytes` takes them from a numpy Generator, which is for SIMULATION ONLY: a
deployment must draw private keys from the OS CSPRNG (os.urandom / `secrets`).
"""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32
NONCE_BYTES = 12


class ShareDecryptionError(ValueError):
    """An encrypted share failed authentication: wrong key, or ciphertext/associated data altered."""


def draw_private_bytes(rng: np.random.Generator) -> bytes:
    """32 private-key bytes from a numpy Generator. Simulation only: not a CSPRNG."""
    return rng.bytes(KEY_BYTES)


def keypair_from_bytes(private_bytes: bytes) -> tuple[X25519PrivateKey, bytes]:
    """X25519 key pair from 32 private bytes: (private key object, 32-byte raw public key)."""
    if not isinstance(private_bytes, (bytes, bytearray)) or len(private_bytes) != KEY_BYTES:
        raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes")
    # X25519 clamps the scalar itself (RFC 7748), so any 32 bytes form a valid private key.
    private = X25519PrivateKey.from_private_bytes(bytes(private_bytes))
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, public


def pair_info(purpose: bytes, round_id: int, i: int, j: int) -> bytes:
    """HKDF `info` for the pair {i, j}: the same for both sides (ids are ordered), distinct per
    purpose and round, so seeds and keys are never reused across masks, rounds or roles."""
    a, b = sorted((int(i), int(j)))
    return b"fedmeta-secagg|" + purpose + b"|%d|%d|%d" % (round_id, a, b)


def shared_seed(my_private: X25519PrivateKey, their_public_bytes: bytes, info: bytes) -> bytes:
    """32-byte seed shared by both ends: HKDF-SHA256(X25519(my_sk, their_pk), info).

    Symmetric: shared_seed(sk_u, pk_v, info) == shared_seed(sk_v, pk_u, info).
    """
    if len(their_public_bytes) != KEY_BYTES:
        raise ValueError(f"X25519 public key must be {KEY_BYTES} bytes")
    try:
        raw = my_private.exchange(X25519PublicKey.from_public_bytes(bytes(their_public_bytes)))
    except ValueError as exc:  # low-order point: the shared secret would be all zeros
        raise ValueError(f"invalid peer public key for X25519 agreement: {exc}") from exc
    # HKDF turns the (non-uniform) curve point into a uniform key; no salt is needed since the
    # DH output already has full entropy and `info` provides domain separation.
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(raw)


def _check_key_nonce(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"AES-GCM nonce must be {NONCE_BYTES} bytes")


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes, nonce: bytes) -> bytes:
    """AES-256-GCM encryption (ciphertext || 16-byte tag).

    The nonce must never repeat under one key. Each pairwise key encrypts one message per round
    (keys are derived per round via `pair_info`), so a fixed nonce is acceptable there.
    `associated_data` binds the ciphertext to its context (sender, recipient, round).
    """
    _check_key_nonce(key, nonce)
    return AESGCM(bytes(key)).encrypt(bytes(nonce), bytes(plaintext), bytes(associated_data))


def decrypt_share(key: bytes, ciphertext: bytes, associated_data: bytes, nonce: bytes) -> bytes:
    """Inverse of `encrypt_share`; raises ShareDecryptionError if anything was tampered with."""
    _check_key_nonce(key, nonce)
    try:
        return AESGCM(bytes(key)).decrypt(bytes(nonce), bytes(ciphertext), bytes(associated_data))
    except InvalidTag as exc:
        raise ShareDecryptionError(
            "encrypted share failed authentication: wrong key, or the ciphertext or its "
            "associated data (sender/recipient/round) was modified"
        ) from exc
