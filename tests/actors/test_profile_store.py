"""ProfileStore: encryption at rest, tamper detection, tokens, consent, deletion from the file, key rotation."""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import fedmeta.actors.profile_store.store as ps  # the module whose calls to `seal` a test intercepts
from fedmeta.actors.profile_store import (
    PURPOSES,
    AccessDenied,
    MasterKeyMismatch,
    ProfileStore,
    ProfileStoreActor,
    TamperedRecordError,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))
LATENTS = np.arange(64, dtype=np.float32) * 1.2345  # distinctive plaintext bytes to look for on disk


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "profiles.db"


@pytest.fixture
def store(db):
    with ProfileStore(db, KEY) as s:
        yield s


def raw_execute(path: Path, sql: str, params: tuple = ()) -> list:
    """Edit the database behind the store's back, as an attacker with the file would."""
    conn = sqlite3.connect(path)
    with conn:
        rows = conn.execute(sql, params).fetchall()
    conn.close()
    return rows


def sealed_bytes(path: Path, user_id: int, name: str) -> bytes:
    return bytes(
        raw_execute(path, "SELECT sealed FROM vectors WHERE user_id = ? AND name = ?", (user_id, name))[0][0]
    )


def flip_byte(blob: bytes, i: int) -> bytes:
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :]


def windows(data: bytes, size: int = 16) -> list[bytes]:
    return [data[i : i + size] for i in range(len(data) - size + 1)]


def assert_absent(path: Path, secret: bytes) -> None:
    content = path.read_bytes()
    leaked = [i for i, w in enumerate(windows(secret)) if w in content]
    assert not leaked, f"{len(leaked)} 16-byte windows of a {len(secret)}-byte secret are still in {path}"


# ----------------------------------------------------------------------------- round trip and at rest


@pytest.mark.parametrize(
    "vector",
    [
        LATENTS,
        np.linspace(-1, 1, 12, dtype=np.float64).reshape(3, 4),
        np.ones((2, 5), dtype=np.float16, order="F"),
        np.arange(7, dtype=np.int32),
        np.array([1.5, -2.0], dtype=">f8"),
    ],
)
def test_round_trip_is_exact(store, vector):
    token = store.register(7)
    store.put_vector(7, token, "class_mean_latents", vector)
    out = store.get_vector(7, token, "class_mean_latents")
    assert out.dtype == vector.dtype and out.shape == vector.shape
    np.testing.assert_array_equal(out, vector)
    assert store.list_vectors(7, token) == ["class_mean_latents"]


def test_put_replaces_and_names_are_separate(store):
    token = store.register(1)
    store.put_vector(1, token, "b", LATENTS)
    store.put_vector(1, token, "a", LATENTS * 2)
    store.put_vector(1, token, "b", LATENTS * 3)
    assert store.list_vectors(1, token) == ["a", "b"]
    np.testing.assert_array_equal(store.get_vector(1, token, "b"), LATENTS * 3)
    with pytest.raises(KeyError, match="no vector named 'c'"):
        store.get_vector(1, token, "c")


def test_no_plaintext_on_disk(db):
    with ProfileStore(db, KEY) as store:
        token = store.register(3)
        store.put_vector(3, token, "class_mean_latents", LATENTS)
    content = db.read_bytes()
    assert LATENTS.tobytes() not in content
    assert_absent(db, LATENTS.tobytes())  # not even a 16-byte piece
    assert token.encode() not in content and KEY not in content


# ----------------------------------------------------------------------------- tampering


def test_flipped_ciphertext_or_nonce_byte_is_detected(db, store):
    token = store.register(5)
    store.put_vector(5, token, "v", LATENTS)
    good = sealed_bytes(db, 5, "v")
    for i in (0, 11, 12, len(good) // 2, len(good) - 1):  # nonce, body and tag bytes
        raw_execute(db, "UPDATE vectors SET sealed = ? WHERE user_id = 5", (flip_byte(good, i),))
        with pytest.raises(TamperedRecordError, match="vector 'v' of user 5"):
            store.get_vector(5, token, "v")
    raw_execute(db, "UPDATE vectors SET sealed = ? WHERE user_id = 5", (good[:20],))
    with pytest.raises(TamperedRecordError, match="truncated"):
        store.get_vector(5, token, "v")


def test_row_moved_to_another_user_or_name_is_detected(db, store):
    alice, bob = store.register(1), store.register(2)
    store.put_vector(1, alice, "v", LATENTS)
    store.put_vector(2, bob, "v", -LATENTS)
    store.set_consent(2, bob, "grouping", True)
    raw_execute(db, "UPDATE vectors SET sealed = ? WHERE user_id = 2", (sealed_bytes(db, 1, "v"),))
    with pytest.raises(TamperedRecordError, match="user 2"):
        store.get_vector(2, bob, "v")
    with pytest.raises(TamperedRecordError, match="user 2"):  # the federation is not fooled either
        store.vectors_for("grouping", "v")
    store.put_vector(1, alice, "w", LATENTS)
    raw_execute(db, "UPDATE vectors SET name = 'w2' WHERE user_id = 1 AND name = 'w'")
    with pytest.raises(TamperedRecordError, match="vector 'w2' of user 1"):
        store.get_vector(1, alice, "w2")


def test_flipped_wrapped_data_key_is_detected(db, store):
    token = store.register(9)
    store.put_vector(9, token, "v", LATENTS)
    wrapped = bytes(raw_execute(db, "SELECT wrapped FROM data_keys WHERE user_id = 9")[0][0])
    raw_execute(db, "UPDATE data_keys SET wrapped = ? WHERE user_id = 9", (flip_byte(wrapped, 20),))
    with pytest.raises(TamperedRecordError, match="data key of user 9"):
        store.get_vector(9, token, "v")


def test_failed_write_rolls_back(store, monkeypatch):
    token = store.register(4)
    calls = []

    def failing_seal(key, plaintext, ad):  # wraps the new data key, then dies sealing the vector
        calls.append(ad)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_seal(key, plaintext, ad)

    real_seal = ps.seal
    monkeypatch.setattr(ps, "seal", failing_seal)
    with pytest.raises(RuntimeError):
        store.put_vector(4, token, "v", LATENTS)
    monkeypatch.undo()
    assert store._conn.execute("SELECT COUNT(*) FROM data_keys").fetchone()[0] == 0
    assert store.list_vectors(4, token) == []
    store.put_vector(4, token, "v", LATENTS)
    np.testing.assert_array_equal(store.get_vector(4, token, "v"), LATENTS)


# ----------------------------------------------------------------------------- access control


def test_wrong_token_is_denied_everywhere(store):
    token = store.register(7)
    store.put_vector(7, token, "v", LATENTS)
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    calls = [
        lambda t: store.get_vector(7, t, "v"),
        lambda t: store.put_vector(7, t, "v", LATENTS),
        lambda t: store.list_vectors(7, t),
        lambda t: store.set_consent(7, t, "grouping", True),
        lambda t: store.set_consent(7, t, "grouping", False),
        lambda t: store.consents(7, t),
        lambda t: store.revoke(7, t),
        lambda t: store.delete_user(7, t),
    ]
    for call in calls:
        with pytest.raises(AccessDenied, match="access denied for user 7: token does not match"):
            call(wrong)
        for missing in (None, ""):
            with pytest.raises(AccessDenied, match="user 7: no token given"):
                call(missing)
    other = store.register(8)
    with pytest.raises(AccessDenied, match="token does not match"):  # another user's token is wrong too
        store.get_vector(7, other, "v")
    np.testing.assert_array_equal(store.get_vector(7, token, "v"), LATENTS)  # nothing changed


def test_unknown_user_is_denied(store):
    with pytest.raises(AccessDenied, match="access denied for user 42: unknown user"):
        store.get_vector(42, "whatever", "v")
    with pytest.raises(AccessDenied, match="unknown user"):
        store.put_vector(42, "whatever", "v", LATENTS)
    assert isinstance(AccessDenied("x"), PermissionError)


def test_register_twice_is_an_error_and_tokens_are_not_stored(db, store):
    token = store.register(1)
    with pytest.raises(ValueError, match="user 1 is already registered"):
        store.register(1)
    assert token.encode() not in db.read_bytes()


# ----------------------------------------------------------------------------- consent and revocation


def test_consent_defaults_to_none_and_purposes_are_checked(store):
    token = store.register(1)
    assert store.consents(1, token) == {p: False for p in PURPOSES}
    store.put_vector(1, token, "v", LATENTS)
    assert store.vectors_for("personalization", "v") == {}
    assert store.eligible("personalization", [1]) == []
    with pytest.raises(ValueError, match="personalization, grouping, analytics"):
        store.set_consent(1, token, "marketing", True)
    with pytest.raises(ValueError, match="purpose must be one of"):
        store.eligible("marketing", [1])
    store.set_consent(1, token, "analytics", True)
    assert store.consents(1, token) == {"personalization": False, "grouping": False, "analytics": True}


def test_revoking_one_purpose_excludes_only_that_purpose(store):
    tokens = {u: store.register(u) for u in (1, 2, 3)}
    for u, t in tokens.items():
        store.put_vector(u, t, "v", LATENTS + u)
        store.set_consent(u, t, "grouping", True)
        store.set_consent(u, t, "personalization", True)
    assert sorted(store.vectors_for("grouping", "v")) == [1, 2, 3]
    assert store.revoke(2, tokens[2], "grouping") is False  # still consents to something
    assert sorted(store.vectors_for("grouping", "v")) == [1, 3]
    assert list(store.vectors_for("grouping", "v", [3, 2, 1])) == [3, 1]
    assert store.eligible("grouping", [3, 2, 1, 3]) == [3, 1, 3]
    assert store.eligible("personalization", [3, 2, 1]) == [3, 2, 1]
    np.testing.assert_array_equal(store.vectors_for("personalization", "v", [2])[2], LATENTS + 2)
    assert store.vectors_for("grouping", "missing") == {}


@pytest.mark.parametrize("vacuum", [True, False])
@pytest.mark.parametrize("how", ["revoke_all", "revoke_each", "set_consent_false", "delete"])
def test_withdrawn_data_is_gone_from_the_file(db, vacuum, how):
    secret = (np.arange(300, dtype=np.float64) * 3.21).reshape(20, 15)  # spans several pages' worth
    with ProfileStore(db, KEY, vacuum=vacuum) as store:
        token, keep = store.register(1), store.register(2)
        for u, t in ((1, token), (2, keep)):
            store.set_consent(u, t, "grouping", True)
            store.set_consent(u, t, "analytics", True)
            store.put_vector(u, t, "v", secret + u)
        sealed = sealed_bytes(db, 1, "v")
        wrapped = bytes(raw_execute(db, "SELECT wrapped FROM data_keys WHERE user_id = 1")[0][0])
        assert sealed in db.read_bytes() and wrapped in db.read_bytes()  # so "absent" below means something
        if how == "revoke_all":
            assert store.revoke(1, token) is True
        elif how == "revoke_each":
            assert store.revoke(1, token, "grouping") is False
            assert store.revoke(1, token, "analytics") is True
        elif how == "set_consent_false":
            store.set_consent(1, token, "grouping", False)
            store.set_consent(1, token, "analytics", False)
        else:
            store.delete_user(1, token)
        assert store.vectors_for("grouping", "v").keys() == {2}
        assert store.eligible("analytics", [1, 2]) == [2]
        if how == "delete":
            with pytest.raises(AccessDenied, match="unknown user"):
                store.list_vectors(1, token)
        else:  # still registered, but the vectors and the data key are shredded
            assert store.list_vectors(1, token) == []
            assert store.consents(1, token) == {p: False for p in PURPOSES}
        np.testing.assert_array_equal(store.get_vector(2, keep, "v"), secret + 2)
    for gone in (sealed, wrapped, (secret + 1).tobytes()):
        assert_absent(db, gone)
    assert not Path(str(db) + "-journal").exists()


def test_user_can_come_back_after_shredding_or_deletion(store):
    token = store.register(1)
    store.set_consent(1, token, "grouping", True)
    store.put_vector(1, token, "v", LATENTS)
    store.revoke(1, token)
    store.set_consent(1, token, "grouping", True)
    store.put_vector(1, token, "v", LATENTS * 2)  # a fresh data key
    assert list(store.vectors_for("grouping", "v")) == [1]
    store.delete_user(1, token)
    token2 = store.register(1)
    assert store.consents(1, token2) == {p: False for p in PURPOSES} and store.list_vectors(1, token2) == []


# ----------------------------------------------------------------------------- master key


def test_master_key_rotation(db):
    with ProfileStore(db, KEY) as store:
        tokens = {u: store.register(u) for u in range(4)}
        for u, t in tokens.items():
            store.put_vector(u, t, "v", LATENTS + u)
        sealed_before = sealed_bytes(db, 0, "v")
        store.rotate_master_key(OTHER_KEY)
        np.testing.assert_array_equal(store.get_vector(3, tokens[3], "v"), LATENTS + 3)
    assert sealed_bytes(db, 0, "v") == sealed_before  # vectors were not re-encrypted
    with pytest.raises(MasterKeyMismatch, match="does not open"):
        ProfileStore(db, KEY)
    with ProfileStore(db, OTHER_KEY) as store:
        for u, t in tokens.items():
            np.testing.assert_array_equal(store.get_vector(u, t, "v"), LATENTS + u)


def test_old_master_key_cannot_unwrap_rotated_data_keys(db):
    with ProfileStore(db, KEY) as store:
        token = store.register(1)
        store.put_vector(1, token, "v", LATENTS)
        store.rotate_master_key(OTHER_KEY)
        store._master_key = KEY  # bypass the open-time check: the data key itself must refuse
        with pytest.raises(TamperedRecordError, match="data key of user 1"):
            store.get_vector(1, token, "v")


def test_failed_rotation_changes_nothing(db):
    with ProfileStore(db, KEY) as store:
        tokens = {u: store.register(u) for u in (1, 2)}
        for u, t in tokens.items():
            store.put_vector(u, t, "v", LATENTS)
        wrapped = bytes(raw_execute(db, "SELECT wrapped FROM data_keys WHERE user_id = 2")[0][0])
        raw_execute(db, "UPDATE data_keys SET wrapped = ? WHERE user_id = 2", (flip_byte(wrapped, 30),))
        with pytest.raises(TamperedRecordError, match="data key of user 2"):
            store.rotate_master_key(OTHER_KEY)
        np.testing.assert_array_equal(store.get_vector(1, tokens[1], "v"), LATENTS)  # still the old key
    ProfileStore(db, KEY).close()


def test_key_file_is_created_private_and_reused(tmp_path, db):
    key_file = tmp_path / "master.key"
    with ProfileStore(db, key_file=key_file) as store:
        token = store.register(1)
        store.put_vector(1, token, "v", LATENTS)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with ProfileStore(db, key_file=key_file) as store:
        np.testing.assert_array_equal(store.get_vector(1, token, "v"), LATENTS)
        store.rotate_master_key(OTHER_KEY)  # rewrites the key file too
    assert key_file.read_bytes() == OTHER_KEY and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "master.key.new").exists()
    with ProfileStore(db, key_file=key_file) as store:
        np.testing.assert_array_equal(store.get_vector(1, token, "v"), LATENTS)


def test_missing_or_wrong_key_file_is_an_error_and_changes_nothing(tmp_path, db):
    key_file = tmp_path / "master.key"
    with ProfileStore(db, key_file=key_file) as store:
        token = store.register(1)
        store.put_vector(1, token, "v", LATENTS)
    backup = tmp_path / "backup.key"
    key_file.rename(backup)
    before = db.read_bytes()
    with pytest.raises(MasterKeyMismatch, match=f"key file {key_file} is missing"):
        ProfileStore(db, key_file=key_file)
    assert not key_file.exists() and db.read_bytes() == before  # no new key in the backup's place
    key_file.write_bytes(OTHER_KEY)
    with pytest.raises(MasterKeyMismatch, match="does not open"):
        ProfileStore(db, key_file=key_file)
    assert key_file.read_bytes() == OTHER_KEY and db.read_bytes() == before
    backup.replace(key_file)
    with ProfileStore(db, key_file=key_file) as store:
        np.testing.assert_array_equal(store.get_vector(1, token, "v"), LATENTS)


def test_bad_master_keys(tmp_path, db):
    bad = tmp_path / "short.key"
    bad.write_bytes(b"x" * 31)
    with pytest.raises(ValueError, match=f"key file {bad} holds 31 bytes"):
        ProfileStore(db, key_file=bad)
    with pytest.raises(ValueError, match="master_key must be exactly 32 bytes, got 16"):
        ProfileStore(db, b"k" * 16)
    with pytest.raises(TypeError, match="master_key must be 32 bytes, got str"):
        ProfileStore(db, "k" * 32)
    with pytest.raises(ValueError, match="exactly one of master_key"):
        ProfileStore(db)
    with pytest.raises(ValueError, match="exactly one of master_key"):
        ProfileStore(db, KEY, key_file=bad)
    with ProfileStore(db, KEY) as store, pytest.raises(ValueError, match="new_key must be exactly 32"):
        store.rotate_master_key(b"short")


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "call, error, field",
    [
        (lambda s, t: s.register(-1), ValueError, "user_id must be a non-negative int"),
        (lambda s, t: s.register(2**63), ValueError, "user_id"),
        (lambda s, t: s.register(True), TypeError, "user_id must be a non-negative int"),
        (lambda s, t: s.get_vector("1", t, "v"), TypeError, "user_id"),
        (lambda s, t: s.put_vector(1, t, "", LATENTS), ValueError, "name must be a non-empty str"),
        (lambda s, t: s.put_vector(1, t, "n" * 129, LATENTS), ValueError, "at most 128 characters"),
        (lambda s, t: s.put_vector(1, t, 5, LATENTS), TypeError, "name must be a str"),
        (lambda s, t: s.put_vector(1, t, "\ud800", LATENTS), ValueError, "name must be valid unicode"),
        (lambda s, t: s.put_vector(1, t, "v", np.array([1.0, np.nan])), ValueError, "vector must be finite"),
        (lambda s, t: s.put_vector(1, t, "v", np.array([np.inf])), ValueError, "vector must be finite"),
        (lambda s, t: s.put_vector(1, t, "v", np.array(["a", "b"])), TypeError, "vector must be a numeric"),
        (lambda s, t: s.put_vector(1, t, "v", np.array([1 + 2j])), TypeError, "vector must be a numeric"),
        (lambda s, t: s.put_vector(1, t, "v", np.array([True])), TypeError, "vector must be a numeric"),
        (lambda s, t: s.put_vector(1, t, "v", np.zeros((2, 2, 2))), ValueError, "1-D or 2-D"),
        (lambda s, t: s.put_vector(1, t, "v", np.float32(3)), ValueError, "1-D or 2-D"),
        (lambda s, t: s.put_vector(1, t, "v", np.zeros(0)), ValueError, "non-empty"),
        (lambda s, t: s.put_vector(1, t, "v", np.zeros(1 << 22)), ValueError, "not raw data"),
        (lambda s, t: s.set_consent(1, t, "grouping", 1), TypeError, "granted must be a bool"),
        (lambda s, t: s.eligible("grouping", [1, -3]), ValueError, r"user_ids\[1\]"),
        (lambda s, t: s.eligible("grouping", "12"), TypeError, "user_ids must be an iterable"),
        (lambda s, t: s.vectors_for(None, "v"), ValueError, "purpose must be one of personalization"),
        (lambda s, t: s.vectors_for("grouping", "v", [1.5]), TypeError, r"user_ids\[0\]"),
    ],
)
def test_bad_inputs_name_the_field(store, call, error, field):
    token = store.register(1)
    with pytest.raises(error, match=field):
        call(store, token)


def test_numpy_ints_and_lists_are_accepted(store):
    token = store.register(np.int64(11))
    store.put_vector(np.int32(11), token, "v", [1.0, 2.5])
    store.set_consent(11, token, "grouping", np.bool_(True))
    out = store.vectors_for("grouping", "v", np.array([11, 12]))
    np.testing.assert_array_equal(out[11], np.array([1.0, 2.5]))


# ----------------------------------------------------------------------------- concurrency and Ray


def test_threads_share_one_store(store):
    tokens = {u: store.register(u) for u in range(8)}

    def work(u: int) -> None:
        for i in range(10):
            store.put_vector(u, tokens[u], f"v{i % 3}", LATENTS + u + i)
            store.get_vector(u, tokens[u], f"v{i % 3}")

    threads = [threading.Thread(target=work, args=(u,)) for u in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for u, t in tokens.items():
        np.testing.assert_array_equal(store.get_vector(u, t, "v0"), LATENTS + u + 9)


def test_ray_actor(ray_session, db):
    actor = ProfileStoreActor.remote(path=str(db), master_key=KEY)
    ray = ray_session
    tokens = {u: ray.get(actor.register.remote(u)) for u in (1, 2)}
    for u, t in tokens.items():
        ray.get(actor.put_vector.remote(u, t, "class_mean_latents", LATENTS * u))
    ray.get(actor.set_consent.remote(2, tokens[2], "grouping", True))
    out = ray.get(actor.vectors_for.remote("grouping", "class_mean_latents"))
    assert list(out) == [2]
    np.testing.assert_array_equal(out[2], LATENTS * 2)
    with pytest.raises(AccessDenied):
        ray.get(actor.get_vector.remote(1, tokens[2], "class_mean_latents"))
    ray.get(actor.close.remote())
    ray.kill(actor)


# ----------------------------------------------------------------------------- property

float_arrays = st.sampled_from([np.float16, np.float32, np.float64]).flatmap(
    lambda dt: arrays(
        dt,
        array_shapes(min_dims=1, max_dims=2, max_side=8),
        elements=st.floats(-1e4, 1e4, allow_nan=False, width=np.dtype(dt).itemsize * 8),
    )
)
names = st.text(min_size=1, max_size=128).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))


@settings(max_examples=40, deadline=None)
@given(
    vectors=st.lists(float_arrays, min_size=1, max_size=3), name_list=st.lists(names, min_size=1, max_size=3)
)
def test_put_get_round_trips(vectors, name_list):
    with tempfile.TemporaryDirectory() as tmp, ProfileStore(os.path.join(tmp, "p.db"), KEY) as store:
        token = store.register(0)
        expected = {}
        for name, vector in zip(name_list, vectors):
            store.put_vector(0, token, name, vector)
            expected[name] = vector
        assert store.list_vectors(0, token) == sorted(expected)
        for name, vector in expected.items():
            out = store.get_vector(0, token, name)
            assert out.dtype == vector.dtype and out.shape == vector.shape
            np.testing.assert_array_equal(out, vector)


def test_register_many_is_atomic_and_grants_sign_up_consent(tmp_path):
    with ProfileStore(tmp_path / "p.sqlite", master_key=bytes(range(32))) as store:
        tokens = store.register_many([3, 1, 2], consent_to=["personalization"])
        assert set(tokens) == {1, 2, 3} and len(set(tokens.values())) == 3
        assert store.eligible("personalization", [1, 2, 3, 4]) == [1, 2, 3]
        assert store.eligible("grouping", [1, 2, 3]) == []
        assert store.consents(2, tokens[2])["personalization"] is True
        with pytest.raises(ValueError, match=r"users \[3\] are already registered"):
            store.register_many([5, 3])
        with pytest.raises(AccessDenied):  # nothing of the failed batch was kept
            store.consents(5, "x")
