"""Envelope encryption of the profile store: AES-256-GCM seals, their associated data, key files.

Each vector is sealed under its user's random data key, and each data key is wrapped (sealed) under
the master key, with a fresh random 12-byte nonce per write (``seal`` / ``open_sealed``). The
associated data (``vector_ad``, ``data_key_ad``) binds a ciphertext to its user and name without
being stored, so a flipped byte or a ciphertext moved to another row raises TamperedRecordError
instead of returning wrong data. Also here: what is sealed (a vector's npy bytes, dtype and shape
included), the salted hash that stands for a user's token, and the master key file (read, or
created 0o600 and never overwritten; a rotation stages the new key next to it).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedmeta.actors.profile_store.errors import TamperedRecordError

MASTER_KEY_BYTES = 32  # AES-256
DATA_KEY_BYTES = 32
NONCE_BYTES = 12  # the AES-GCM standard nonce; random is safe for far fewer than 2^32 writes per key
TAG_BYTES = 16
SALT_BYTES = 16
AD_PREFIX = "fedmeta/profile-store/v1"
KEY_CHECK_AD = f"{AD_PREFIX}/key-check".encode()


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AES-256-GCM with a fresh random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, sealed: bytes, ad: bytes, what: str) -> bytes:
    """Inverse of `seal`; `what` names the record in the error ("vector 'x' of user 7")."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise TamperedRecordError(f"{what} is truncated ({len(sealed)} bytes): the record was tampered with")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except InvalidTag:
        raise TamperedRecordError(
            f"{what} failed authentication: it was modified, moved from another "
            "user or record, or sealed under another key"
        ) from None


def vector_ad(user_id: int, name: str) -> bytes:
    # The user id is digits and comes before the name, so (user, name) -> AD is one-to-one.
    return f"{AD_PREFIX}/vector/{user_id}/{name}".encode()


def data_key_ad(user_id: int) -> bytes:
    return f"{AD_PREFIX}/data-key/{user_id}".encode()


def token_hash(salt: bytes, token: str) -> bytes:
    # Tokens carry 256 random bits, so a fast keyed hash suffices: there is nothing to brute-force.
    return hmac.new(salt, token.encode(), hashlib.sha256).digest()


def encode_vector(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vector, allow_pickle=False)  # the npy header keeps dtype and shape, sealed with the data
    return buf.getvalue()


def decode_vector(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_or_create_key_file(path: str | os.PathLike) -> bytes:
    """Read a 32-byte master key from `path`, or create the file (mode 0o600) with a random key."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never overwrite a key
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(
                f"key file {path} holds {len(key)} bytes; a master key is exactly {MASTER_KEY_BYTES} bytes"
            ) from None
        return key
    key = os.urandom(MASTER_KEY_BYTES)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def stage_key_file(path: Path, key: bytes) -> Path:
    """Write `key` next to `path` (as path + ".new", mode 0o600) so a rotation can swap it in."""
    staged = path.with_name(path.name + ".new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return staged
