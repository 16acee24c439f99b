"""Input checks of the profile store: every argument is refused with a TypeError or ValueError that
names it before it reaches SQLite or a cipher (user ids are non-negative 64-bit ints and never bools,
names short valid text, purposes one of PURPOSES, vectors finite non-empty 1-D or 2-D numeric arrays
small enough to be aggregated features rather than raw data, master keys exactly 32 bytes).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedmeta.actors.profile_store.consent import PURPOSES
from fedmeta.actors.profile_store.crypto import MASTER_KEY_BYTES

MAX_NAME_CHARS = 128
MAX_VECTOR_BYTES = 1 << 24  # aggregated features are small; a bigger array is probably raw data
MAX_USER_ID = (1 << 63) - 1  # SQLite INTEGER is a signed 64-bit int


def check_master_key(key: object, field: str = "master_key") -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"{field} must be {MASTER_KEY_BYTES} bytes, got {type(key).__name__}")
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"{field} must be exactly {MASTER_KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)


def check_user_id(user_id: object, field: str = "user_id") -> int:
    # bool is an int subclass, but True is not a user id.
    if isinstance(user_id, (bool, np.bool_)) or not isinstance(user_id, (int, np.integer)):
        raise TypeError(f"{field} must be a non-negative int, got {type(user_id).__name__} {user_id!r}")
    if not 0 <= int(user_id) <= MAX_USER_ID:
        raise ValueError(f"{field} must be a non-negative int below 2**63, got {user_id}")
    return int(user_id)


def check_user_ids(user_ids: Iterable[object]) -> list[int]:
    if isinstance(user_ids, (str, bytes)):
        raise TypeError(f"user_ids must be an iterable of ints, got {type(user_ids).__name__}")
    return [check_user_id(u, f"user_ids[{i}]") for i, u in enumerate(user_ids)]


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise ValueError(
            f"name must be a non-empty str of at most {MAX_NAME_CHARS} characters, got {len(name)} characters"
        )
    try:
        name.encode()
    except UnicodeEncodeError:
        raise ValueError(f"name must be valid unicode text (no lone surrogates), got {name!r}") from None
    return name


def check_purpose(purpose: object) -> str:
    if not isinstance(purpose, str) or purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}")
    return purpose  # type: ignore[return-value]


def check_granted(granted: object) -> bool:
    if not isinstance(granted, (bool, np.bool_)):
        raise TypeError(f"granted must be a bool, got {type(granted).__name__} {granted!r}")
    return bool(granted)


def check_vector(vector: object) -> np.ndarray:
    """A finite, non-empty, 1-D or 2-D integer or float array (array-likes are converted)."""
    arr = np.asarray(vector)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"vector must be a numeric (integer or float) array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise ValueError(f"vector must be a non-empty 1-D or 2-D array, got shape {arr.shape}")
    if arr.nbytes > MAX_VECTOR_BYTES:
        raise ValueError(
            f"vector must be at most {MAX_VECTOR_BYTES} bytes (aggregated features, not raw "
            f"data), got {arr.nbytes}"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("vector must be finite: it contains NaN or inf")
    return arr
