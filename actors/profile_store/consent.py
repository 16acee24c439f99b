"""Consent rows and their MAC: per user and purpose, in the clear but authenticated.

A consent row (user, purpose, granted, version) carries HMAC-SHA256 under a consent key derived
from the master key (``consent_key``, ``consent_mac``); every write bumps the row's version and
takes a new MAC (``write_consent``), a row that was edited, inserted or copied to another user or
purpose is refused on read (``check_consent``, raising TamperedRecordError), and a rotation of the
master key or the migration of a schema-1 store re-MACs every row (``remac``). A deleted row reads
as not granted, a denial; an older row with its MAC put back is not detected.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time

from fedmeta.actors.profile_store.crypto import AD_PREFIX
from fedmeta.actors.profile_store.errors import TamperedRecordError

PURPOSES = ("personalization", "grouping", "analytics")


def consent_key(master_key: bytes) -> bytes:
    """The key consent rows are authenticated with, derived from the master key."""
    return hmac.new(master_key, f"{AD_PREFIX}/consent-mac".encode(), hashlib.sha256).digest()


def consent_mac(key: bytes, user_id: int, purpose: str, granted: bool, version: int) -> bytes:
    return hmac.new(
        key, f"{int(user_id)}\x00{purpose}\x00{int(bool(granted))}\x00{int(version)}".encode(), hashlib.sha256
    ).digest()


def check_consent(master_key: bytes, user_id: int, purpose: str, granted: int, version: int, mac) -> None:
    """Refuse a consent row the store did not write (edited, inserted, copied)."""
    want = consent_mac(consent_key(master_key), user_id, purpose, granted, version)
    if mac is None or not hmac.compare_digest(bytes(mac), want):
        raise TamperedRecordError(
            f"consents: the row of user {user_id}, purpose {purpose!r} fails its MAC "
            "(changed outside the store); refusing to read consent from it"
        )


def write_consent(
    conn: sqlite3.Connection, master_key: bytes, user_id: int, purpose: str, granted: bool
) -> None:
    row = conn.execute(
        "SELECT version FROM consents WHERE user_id = ? AND purpose = ?", (user_id, purpose)
    ).fetchone()
    version = 1 if row is None else int(row[0]) + 1  # each write a new version, each under its own MAC
    mac = consent_mac(consent_key(master_key), user_id, purpose, granted, version)
    conn.execute(
        "INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, purpose) "
        "DO UPDATE SET granted = excluded.granted, updated_at = excluded.updated_at, "
        "version = excluded.version, mac = excluded.mac",
        (user_id, purpose, int(granted), time.time(), version, mac),
    )


def granted_purposes(conn: sqlite3.Connection, master_key: bytes, user_id: int) -> set[str]:
    rows = conn.execute(
        "SELECT purpose, granted, version, mac FROM consents WHERE user_id = ? AND granted = 1", (user_id,)
    ).fetchall()
    for p, g, v, mac in rows:
        check_consent(master_key, user_id, p, g, v, mac)
    return {r[0] for r in rows}


def remac(conn: sqlite3.Connection, master_key: bytes) -> None:
    key = consent_key(master_key)
    for u, p, g, v in conn.execute("SELECT user_id, purpose, granted, version FROM consents").fetchall():
        conn.execute(
            "UPDATE consents SET mac = ? WHERE user_id = ? AND purpose = ?",
            (consent_mac(key, u, p, g, v), u, p),
        )
