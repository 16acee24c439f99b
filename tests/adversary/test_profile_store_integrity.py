"""The profile store against someone who can write its database file (issue 27, item 5): before,
editing the SQLite file to grant `analytics` made `vectors_for("analytics")` return the vector;
and deleting a user did not rotate the master key, so the crypto-shred missed earlier backups."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from fedmeta.actors.profile_store import MasterKeyMismatch, ProfileStore, TamperedRecordError

pytestmark = pytest.mark.adversary


@pytest.fixture
def store(tmp_path):
    s = ProfileStore(tmp_path / "p.sqlite", key_file=tmp_path / "state" / "p.key", vacuum=False)
    yield s
    s.close()


def edit(path, sql, *args):
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, args)
    conn.close()


@pytest.fixture(autouse=True)
def key_folder(tmp_path):
    (tmp_path / "state").mkdir()


def test_an_edited_grant_is_refused_on_read(store, tmp_path):
    tokens = store.register_many([1, 2], ["personalization"])
    store.put_vector(1, tokens[1], "v", np.ones(3))
    assert store.vectors_for("analytics", "v") == {}
    edit(tmp_path / "p.sqlite", "INSERT INTO consents VALUES (1, 'analytics', 1, 0, 1, NULL)")
    with pytest.raises(TamperedRecordError, match="user 1, purpose 'analytics' fails its MAC"):
        store.vectors_for("analytics", "v")
    with pytest.raises(TamperedRecordError):
        store.eligible("analytics", [1, 2])


def test_a_mac_moved_from_another_row_does_not_open_it(store, tmp_path):
    """User 2 granted analytics; the attacker copies that row's version and MAC onto user 1's
    refused row and flips it: the MAC binds user and purpose."""
    tokens = store.register_many([1, 2], ["personalization"])
    store.set_consent(2, tokens[2], "analytics", True)
    store.set_consent(1, tokens[1], "analytics", False)
    conn = sqlite3.connect(tmp_path / "p.sqlite")
    version, mac = conn.execute(
        "SELECT version, mac FROM consents WHERE user_id = 2 AND purpose = 'analytics'"
    ).fetchone()
    conn.close()
    edit(
        tmp_path / "p.sqlite",
        "UPDATE consents SET granted = 1, version = ?, mac = ? WHERE user_id = 1 AND purpose = 'analytics'",
        version,
        mac,
    )
    with pytest.raises(TamperedRecordError, match="user 1"):
        store.eligible("analytics", [1, 2])


def test_honest_consent_changes_still_read(store):
    tokens = store.register_many([1], [])
    for granted in (True, False, True):
        store.set_consent(1, tokens[1], "grouping", granted)
        assert store.eligible("grouping", [1]) == ([1] if granted else [])
    store.rotate_master_key(bytes(range(32)))  # consent MACs follow the master key
    assert store.eligible("grouping", [1]) == [1] and store.consents(1, tokens[1])["grouping"]


def test_deleting_a_user_rotates_the_key_so_an_old_backup_does_not_open(store, tmp_path):
    tokens = store.register_many([1, 2], ["personalization"])
    store.put_vector(1, tokens[1], "v", np.ones(3))
    store.put_vector(2, tokens[2], "v", np.full(3, 2.0))
    shutil.copy(tmp_path / "p.sqlite", tmp_path / "backup.sqlite")  # holds user 1's wrapped data key
    store.delete_user(1, tokens[1])
    assert list(store.vectors_for("personalization", "v")) == [2]  # the others' data is re-wrapped
    shutil.copy(tmp_path / "state" / "p.key", tmp_path / "state" / "b.key")
    with pytest.raises(MasterKeyMismatch):
        ProfileStore(tmp_path / "backup.sqlite", key_file=tmp_path / "state" / "b.key")


def test_a_schema_1_store_is_migrated_with_its_consents(tmp_path):
    path, key = tmp_path / "old.sqlite", bytes(32)
    with ProfileStore(path, master_key=key, vacuum=False) as s:
        tokens = s.register_many([1, 2], ["personalization"])
    conn = sqlite3.connect(path)  # what a schema-1 file looked like: no version, no MAC
    with conn:
        conn.execute(
            "CREATE TABLE c1 (user_id INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE, "
            "purpose TEXT NOT NULL, granted INTEGER NOT NULL, updated_at REAL NOT NULL, "
            "PRIMARY KEY (user_id, purpose))"
        )
        conn.execute("INSERT INTO c1 SELECT user_id, purpose, granted, updated_at FROM consents")
        conn.execute("DROP TABLE consents")
        conn.execute("ALTER TABLE c1 RENAME TO consents")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"1",))
    conn.close()
    with ProfileStore(path, master_key=key, vacuum=False) as s:
        assert s.eligible("personalization", [1, 2]) == [1, 2]
        s.set_consent(1, tokens[1], "analytics", True)
        assert s.eligible("analytics", [1, 2]) == [1]
