"""ProfileStore: the encrypted, consent-gated store of per-user vectors in one SQLite file.

The store owns the database (schema version 2; a schema-1 store is migrated on open), checks at open
that the master key is the one the store was made with, authenticates every user-facing call by the
user's token, gives the federation (``vectors_for``, ``eligible``) only users who consent now,
crypto-shreds a user's vectors and data key when they consent to nothing, and deletes users and
rotates the master key so earlier backups no longer open. Deleted bytes leave the file: secure_delete,
a DELETE-mode journal and, unless ``vacuum=False``, VACUUM (the package docstring has the design).
"""

from __future__ import annotations

import hmac
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmeta.actors.profile_store.checks import (
    check_granted,
    check_master_key,
    check_name,
    check_purpose,
    check_user_id,
    check_user_ids,
    check_vector,
)
from fedmeta.actors.profile_store.consent import (
    PURPOSES,
    check_consent,
    consent_key,
    consent_mac,
    granted_purposes,
    remac,
    write_consent,
)
from fedmeta.actors.profile_store.crypto import (
    DATA_KEY_BYTES,
    KEY_CHECK_AD,
    MASTER_KEY_BYTES,
    SALT_BYTES,
    data_key_ad,
    decode_vector,
    encode_vector,
    load_or_create_key_file,
    open_sealed,
    seal,
    stage_key_file,
    token_hash,
    vector_ad,
)
from fedmeta.actors.profile_store.errors import AccessDenied, MasterKeyMismatch, TamperedRecordError
from fedmeta.sim.artifacts.durable import replace_durably

if TYPE_CHECKING:
    from typing_extensions import Self

SCHEMA_VERSION = b"2"  # 2: consent rows carry a version counter and a MAC (1 is migrated on open)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id INTEGER PRIMARY KEY,
    token_salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS data_keys (
    user_id INTEGER PRIMARY KEY REFERENCES users(user_id) ON DELETE CASCADE,
    wrapped BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (
    user_id INTEGER NOT NULL REFERENCES data_keys(user_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    sealed BLOB NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (user_id, name)
);
CREATE TABLE IF NOT EXISTS consents (
    user_id INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    purpose TEXT NOT NULL,
    granted INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    mac BLOB,
    PRIMARY KEY (user_id, purpose)
);
"""


class ProfileStore:
    """Encrypted per-user feature vectors in one SQLite file; see the module docstring.

    User-facing methods take (user_id, token) and raise AccessDenied unless the token is that user's.
    System-facing methods (`vectors_for`, `eligible`) take no token but see consenting users only.
    Give the master key either as `master_key` (32 bytes) or as `key_file` (read, or created 0o600).
    With `vacuum=False`, deletions rely on secure_delete alone (no O(file size) VACUUM per deletion).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        master_key: bytes | None = None,
        *,
        key_file: str | os.PathLike | None = None,
        vacuum: bool = True,
    ):
        if (master_key is None) == (key_file is None):
            raise ValueError("give exactly one of master_key (32 bytes) or key_file (a path)")
        self.path = str(path)
        self.key_file = None if key_file is None else Path(key_file)
        self.vacuum = vacuum
        if (
            key_file is not None
            and not self.key_file.exists()
            and self.path != ":memory:"
            and os.path.exists(self.path)
            and os.path.getsize(self.path) > 0
        ):
            # a new key could never open this store; creating one would leave a wrong key file in the
            # place the user's backup has to go back to
            raise MasterKeyMismatch(
                f"key file {self.key_file} is missing, and {self.path} was made with a key: "
                "restore that key file (a new key cannot open the store)"
            )
        self._master_key = (
            check_master_key(master_key) if key_file is None else load_or_create_key_file(key_file)
        )
        self._lock = threading.Lock()  # one connection, shared by the threads of a threaded actor
        self._conn = self._connect()
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not os.path.exists(self.path):
            # Create the file private; SQLite gives its journal the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA secure_delete = ON")  # zero deleted cells and freed pages
        conn.execute("PRAGMA journal_mode = DELETE")  # no WAL: it would keep old page images around
        conn.execute("PRAGMA temp_store = MEMORY")  # VACUUM's scratch copy stays off disk
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _init_schema(self) -> None:
        self._conn.executescript(SCHEMA)  # IF NOT EXISTS: a no-op on an existing store
        version = self._meta("schema_version")
        if version is None:
            with self._conn:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                self._conn.execute(
                    "INSERT INTO meta VALUES ('key_check', ?)", (seal(self._master_key, b"", KEY_CHECK_AD),)
                )
        elif version not in (SCHEMA_VERSION, b"1"):
            raise ValueError(f"{self.path}: schema version {version!r}, expected {SCHEMA_VERSION!r}")
        try:
            # Fail at open, not at the first read, when the key is not the one the store was made with.
            open_sealed(self._master_key, self._meta("key_check") or b"", KEY_CHECK_AD, "key check")
        except TamperedRecordError:
            raise MasterKeyMismatch(
                f"the master key does not open {self.path}: wrong key or key file "
                "(or the store's key check was tampered with)"
            ) from None
        if version == b"1":
            self._migrate_v1()

    def _migrate_v1(self) -> None:
        """Schema 1 had unauthenticated consent rows: add the version and the MAC, trusting the rows
        as they are now (the last moment they can be vouched for)."""
        with self._conn:
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(consents)")}
            if "version" not in columns:
                self._conn.execute("ALTER TABLE consents ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
            if "mac" not in columns:
                self._conn.execute("ALTER TABLE consents ADD COLUMN mac BLOB")
            remac(self._conn, self._master_key)
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))

    def _meta(self, key: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ registration and access

    def register(self, user_id: int) -> str:
        """Create a user; returns their access token (only its salted hash is stored)."""
        user_id = check_user_id(user_id)
        token = secrets.token_urlsafe(32)
        salt = os.urandom(SALT_BYTES)
        with self._lock, self._conn:
            if self._user_row(user_id) is not None:
                raise ValueError(f"user {user_id} is already registered")
            self._conn.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?)", (user_id, salt, token_hash(salt, token), time.time())
            )
        return token

    def register_many(self, user_ids: Iterable[int], consent_to: Iterable[str] = ()) -> dict[int, str]:
        """Register many users in one transaction (all or none), each granting `consent_to` at sign-up;
        returns {user id: token}. For onboarding a simulated population."""
        ids = check_user_ids(user_ids)
        purposes = [check_purpose(p) for p in consent_to]
        if len(set(ids)) != len(ids):
            raise ValueError("user_ids: contains duplicates")
        tokens = {u: secrets.token_urlsafe(32) for u in ids}
        with self._lock, self._conn:
            taken = [u for u in ids if self._user_row(u) is not None]
            if taken:
                raise ValueError(f"users {taken[:5]} are already registered")
            now = time.time()
            rows = []
            for u, token in tokens.items():
                salt = os.urandom(SALT_BYTES)
                rows.append((u, salt, token_hash(salt, token), now))
            self._conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?)", rows)
            key = consent_key(self._master_key)
            self._conn.executemany(
                "INSERT INTO consents VALUES (?, ?, 1, ?, 1, ?)",
                [(u, p, now, consent_mac(key, u, p, True, 1)) for u in ids for p in purposes],
            )
        return tokens

    def _user_row(self, user_id: int) -> tuple | None:
        return self._conn.execute(
            "SELECT token_salt, token_hash FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()

    def _authenticate(self, user_id: int, token: object) -> None:
        row = self._user_row(user_id)
        if row is None:
            raise AccessDenied(f"access denied for user {user_id}: unknown user")
        if not isinstance(token, str) or not token:
            raise AccessDenied(f"access denied for user {user_id}: no token given")
        if not hmac.compare_digest(token_hash(row[0], token), row[1]):
            raise AccessDenied(f"access denied for user {user_id}: token does not match")

    # ------------------------------------------------------------------ consent

    def set_consent(self, user_id: int, token: str, purpose: str, granted: bool) -> None:
        """Grant or withdraw one purpose; withdrawing is `revoke(user_id, token, purpose)`."""
        user_id, purpose, granted = check_user_id(user_id), check_purpose(purpose), check_granted(granted)
        if not granted:
            self.revoke(user_id, token, purpose)
            return
        with self._lock:
            self._authenticate(user_id, token)
            with self._conn:
                write_consent(self._conn, self._master_key, user_id, purpose, True)

    def consents(self, user_id: int, token: str) -> dict[str, bool]:
        user_id = check_user_id(user_id)
        with self._lock:
            self._authenticate(user_id, token)
            return {p: p in granted_purposes(self._conn, self._master_key, user_id) for p in PURPOSES}

    def revoke(self, user_id: int, token: str, purpose: str | None = None) -> bool:
        """Withdraw `purpose` (None: all). If the user then consents to nothing, their vectors and data
        key are deleted (crypto-shredded) and the file is scrubbed. Returns whether anything was shredded."""
        user_id = check_user_id(user_id)
        purposes = PURPOSES if purpose is None else (check_purpose(purpose),)
        with self._lock:
            self._authenticate(user_id, token)
            with self._conn:
                for p in purposes:
                    write_consent(self._conn, self._master_key, user_id, p, False)
                shredded = not granted_purposes(self._conn, self._master_key, user_id) and self._shred(
                    user_id
                )
            if shredded:
                self._scrub()
        return shredded

    def delete_user(self, user_id: int, token: str, new_master_key: bytes | None = None) -> None:
        """Remove everything about the user: token hash, data key, vectors, consent rows; then rotate
        the master key (to a fresh random one for a store opened from a key file, else to
        `new_master_key` when given), so a backup taken before the deletion, which still holds the
        user's wrapped data key, does not open with the current key."""
        user_id = check_user_id(user_id)
        if new_master_key is not None:
            new_master_key = check_master_key(new_master_key, "new_master_key")
        with self._lock:
            self._authenticate(user_id, token)
            with self._conn:
                # Children first, so the foreign keys hold at every step.
                for table in ("vectors", "data_keys", "consents", "users"):
                    self._conn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
            self._scrub()
        if new_master_key is None and self.key_file is not None:
            new_master_key = os.urandom(MASTER_KEY_BYTES)
        if new_master_key is not None:
            self.rotate_master_key(new_master_key)

    def _shred(self, user_id: int) -> bool:
        n = self._conn.execute("DELETE FROM vectors WHERE user_id = ?", (user_id,)).rowcount
        n += self._conn.execute("DELETE FROM data_keys WHERE user_id = ?", (user_id,)).rowcount
        return n > 0

    def _scrub(self) -> None:
        # secure_delete already zeroed the freed bytes; VACUUM also drops the freed pages from the file.
        if self.vacuum:
            self._conn.execute("VACUUM")

    # ------------------------------------------------------------------ vectors (user-facing)

    def put_vector(self, user_id: int, token: str, name: str, vector: np.ndarray) -> None:
        """Store (or replace) the user's vector `name`; dtype and shape are kept exactly."""
        user_id, name = check_user_id(user_id), check_name(name)
        plaintext = encode_vector(check_vector(vector))
        with self._lock:
            self._authenticate(user_id, token)
            with self._conn:  # the new data key (if any) and the vector commit together or not at all
                sealed = seal(self._data_key(user_id), plaintext, vector_ad(user_id, name))
                self._conn.execute(
                    "INSERT INTO vectors VALUES (?, ?, ?, ?) ON CONFLICT (user_id, name) "
                    "DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
                    (user_id, name, sealed, time.time()),
                )

    def get_vector(self, user_id: int, token: str, name: str) -> np.ndarray:
        user_id, name = check_user_id(user_id), check_name(name)
        with self._lock:
            self._authenticate(user_id, token)
            row = self._conn.execute(
                "SELECT v.sealed, k.wrapped FROM vectors v JOIN data_keys k USING (user_id) "
                "WHERE v.user_id = ? AND v.name = ?",
                (user_id, name),
            ).fetchone()
            if row is None:
                raise KeyError(f"user {user_id} has no vector named {name!r}")
            return self._decrypt_vector(user_id, name, row[0], row[1])

    def list_vectors(self, user_id: int, token: str) -> list[str]:
        user_id = check_user_id(user_id)
        with self._lock:
            self._authenticate(user_id, token)
            rows = self._conn.execute("SELECT name FROM vectors WHERE user_id = ? ORDER BY name", (user_id,))
            return [r[0] for r in rows]

    def _data_key(self, user_id: int) -> bytes:
        """The user's data key, created (and wrapped) on first use. Call inside a transaction."""
        row = self._conn.execute("SELECT wrapped FROM data_keys WHERE user_id = ?", (user_id,)).fetchone()
        if row is not None:
            return self._unwrap(user_id, row[0])
        key = os.urandom(DATA_KEY_BYTES)
        self._conn.execute(
            "INSERT INTO data_keys VALUES (?, ?)",
            (user_id, seal(self._master_key, key, data_key_ad(user_id))),
        )
        return key

    def _unwrap(self, user_id: int, wrapped: bytes) -> bytes:
        return open_sealed(
            self._master_key, bytes(wrapped), data_key_ad(user_id), f"data key of user {user_id}"
        )

    def _decrypt_vector(self, user_id: int, name: str, sealed: bytes, wrapped: bytes) -> np.ndarray:
        data_key = self._unwrap(user_id, wrapped)
        plaintext = open_sealed(
            data_key, bytes(sealed), vector_ad(user_id, name), f"vector {name!r} of user {user_id}"
        )
        return decode_vector(plaintext)

    # ------------------------------------------------------------------ system-facing (the federation)

    def vectors_for(
        self, purpose: str, name: str, user_ids: Iterable[int] | None = None
    ) -> dict[int, np.ndarray]:
        """Vector `name` of every user (of `user_ids`, if given) who consents to `purpose` right now.
        Users without consent or without that vector are simply absent."""
        purpose, name = check_purpose(purpose), check_name(name)
        ids = None if user_ids is None else check_user_ids(user_ids)
        query = (
            "SELECT v.user_id, v.sealed, k.wrapped, c.granted, c.version, c.mac FROM vectors v "
            "JOIN data_keys k USING (user_id) JOIN consents c USING (user_id) "
            "WHERE c.purpose = ? AND c.granted = 1 AND v.name = ?"
        )
        with self._lock:
            if ids is None:
                rows = self._conn.execute(query + " ORDER BY v.user_id", (purpose, name)).fetchall()
            else:  # point lookups: a cohort may exceed SQLite's limit on bound parameters
                rows = [
                    r
                    for u in dict.fromkeys(ids)
                    for r in self._conn.execute(query + " AND v.user_id = ?", (purpose, name, u))
                ]
            for uid, _, _, granted, version, mac in rows:
                check_consent(self._master_key, uid, purpose, granted, version, mac)
            return {
                uid: self._decrypt_vector(uid, name, sealed, wrapped) for uid, sealed, wrapped, *_ in rows
            }

    def eligible(self, purpose: str, user_ids: Iterable[int]) -> list[int]:
        """The users of `user_ids` who consent to `purpose` right now, in the given order."""
        purpose, ids = check_purpose(purpose), check_user_ids(user_ids)
        with self._lock:
            rows = self._conn.execute(
                "SELECT user_id, granted, version, mac FROM consents WHERE purpose = ? AND granted = 1",
                (purpose,),
            ).fetchall()
            for uid, granted, version, mac in rows:
                check_consent(self._master_key, uid, purpose, granted, version, mac)
            consenting = {r[0] for r in rows}
        return [u for u in ids if u in consenting]

    def rotate_master_key(self, new_key: bytes) -> None:
        """Re-wrap every data key under `new_key` in one transaction; vectors are untouched. A store
        opened from a key file gets the new key written there too (staged as <key_file>.new first)."""
        new_key = check_master_key(new_key, "new_key")
        with self._lock:
            staged = stage_key_file(self.key_file, new_key) if self.key_file else None
            try:
                with self._conn:
                    for user_id, wrapped in self._conn.execute(
                        "SELECT user_id, wrapped FROM data_keys"
                    ).fetchall():
                        rewrapped = seal(new_key, self._unwrap(user_id, wrapped), data_key_ad(user_id))
                        self._conn.execute(
                            "UPDATE data_keys SET wrapped = ? WHERE user_id = ?", (rewrapped, user_id)
                        )
                    self._conn.execute(
                        "UPDATE meta SET value = ? WHERE key = 'key_check'",
                        (seal(new_key, b"", KEY_CHECK_AD),),
                    )
                    remac(self._conn, new_key)  # consent rows are authenticated under the master key too
            except BaseException:
                if staged:
                    staged.unlink(missing_ok=True)
                raise
            if staged:
                replace_durably(staged, self.key_file)  # the database already needs the new key
            self._master_key = new_key
