"""ProfileStore: per-user aggregated feature vectors, encrypted at rest, gated by per-purpose consent.

What is stored: small *aggregated* vectors per user and name (e.g. "class_mean_latents", the
class-mean latents of an auto-encoder, or interaction summaries) -- never raw data. The store is one
embedded SQLite file; the Ray actor (``actor``) is a thin wrapper so one process owns that file.

Envelope encryption. Every user gets a random 32-byte data key. Each vector is sealed with AES-256-GCM
under its user's data key, and the data key itself is sealed ("wrapped") under the master key:

    vectors.sealed   = nonce || AESGCM(data_key).encrypt(nonce, npy bytes, AD = (user id, name))
    data_keys.wrapped = nonce || AESGCM(master_key).encrypt(nonce, data_key, AD = user id)

with a fresh random 12-byte nonce per write. The associated data (AD) is authenticated but not
stored: a ciphertext copied to another user's or another name's row fails to decrypt, as does any
flipped byte; both raise TamperedRecordError instead of returning wrong data. Rotating the master key
re-wraps the (small) data keys only; vector ciphertexts are untouched. Deleting a user's data key
"crypto-shreds" everything sealed under it.

What is on disk (all in the one database file):

    meta(key, value)                              schema version; key_check = seal(master, b"")
    users(user_id, token_salt, token_hash, ...)   HMAC-SHA256(salt, token), never the token
    data_keys(user_id, wrapped)                   data key wrapped under the master key
    vectors(user_id, name, sealed, updated_at)    dtype and shape live inside the sealed npy bytes
    consents(user_id, purpose, granted, updated_at, version, mac)
                                                  mac = HMAC-SHA256(consent key, user, purpose,
                                                  granted, version); consent key = HMAC(master, ...)

In the clear: user ids, vector names, consent flags, timestamps and ciphertext sizes. A consent flag
is in the clear but authenticated: a row edited, inserted or copied to another user or purpose fails
its MAC and is refused on read (TamperedRecordError), so granting a purpose takes the user's token.
Not detected: replacing a row with an *older* ciphertext (or consent row, with its MAC) of the same
(user, name) -- a MAC authenticates a record, not the freshness of the whole database -- nor a deleted
consent row (it reads as not granted: a denial, never a grant).

Privacy semantics:
* Consent is per user and purpose (PURPOSES) and defaults to not granted. The federation reads
  vectors only through `vectors_for` / `eligible`, which see only users who consent *now*, so a user
  who revoked or was deleted is absent from the next round.
* Revoking one purpose while another is still granted only excludes the user from that purpose.
* When a revocation leaves the user consenting to nothing, their vectors and their data key are
  deleted (crypto-shredded); the registration and the consent rows (all "not granted") remain, so the
  user can grant again and upload anew. A user may store vectors before granting any consent: those
  are theirs to read but no purpose sees them.
* `delete_user` removes the user's token hash, data key, vectors and consent rows, then rotates the
  master key (a store opened from a key file; `new_master_key=` for one given its key): a backup of
  the database taken before the deletion, which still holds the user's wrapped data key, no longer
  opens with the current key file. Backups of the old key file are beyond its reach.
* Deleted bytes leave the database *file*: `secure_delete` overwrites freed cells and pages with
  zeros, the rollback journal (DELETE mode, no WAL that would keep old pages around) is removed after
  each commit, and -- unless `vacuum=False` for large stores -- VACUUM rebuilds the file afterwards.
  Bytes the filesystem or SSD keeps in freed blocks are beyond SQLite's reach.

The modules, each importing only those above it:

* ``errors``: AccessDenied, TamperedRecordError, MasterKeyMismatch;
* ``crypto``: AES-256-GCM seals and their associated data, token hashes, the master key file;
* ``consent``: PURPOSES, consent rows and their MAC;
* ``checks``: the checks of every argument;
* ``store``: ProfileStore, the SQLite store;
* ``actor``: ProfileStoreActor, the Ray actor over it.

Everything is re-exported here: import from ``fedmeta.actors.profile_store``.
"""

from __future__ import annotations

from fedmeta.actors.profile_store.actor import ProfileStoreActor
from fedmeta.actors.profile_store.checks import (
    MAX_NAME_CHARS,
    MAX_USER_ID,
    MAX_VECTOR_BYTES,
    check_granted,
    check_master_key,
    check_name,
    check_purpose,
    check_user_id,
    check_user_ids,
    check_vector,
)
from fedmeta.actors.profile_store.consent import PURPOSES, consent_key, consent_mac
from fedmeta.actors.profile_store.crypto import (
    AD_PREFIX,
    DATA_KEY_BYTES,
    KEY_CHECK_AD,
    MASTER_KEY_BYTES,
    NONCE_BYTES,
    SALT_BYTES,
    TAG_BYTES,
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
from fedmeta.actors.profile_store.store import SCHEMA, SCHEMA_VERSION, ProfileStore

__all__ = [
    "AD_PREFIX",
    "DATA_KEY_BYTES",
    "KEY_CHECK_AD",
    "MASTER_KEY_BYTES",
    "MAX_NAME_CHARS",
    "MAX_USER_ID",
    "MAX_VECTOR_BYTES",
    "NONCE_BYTES",
    "PURPOSES",
    "SALT_BYTES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TAG_BYTES",
    "AccessDenied",
    "MasterKeyMismatch",
    "ProfileStore",
    "ProfileStoreActor",
    "TamperedRecordError",
    "check_granted",
    "check_master_key",
    "check_name",
    "check_purpose",
    "check_user_id",
    "check_user_ids",
    "check_vector",
    "consent_key",
    "consent_mac",
    "data_key_ad",
    "decode_vector",
    "encode_vector",
    "load_or_create_key_file",
    "open_sealed",
    "seal",
    "stage_key_file",
    "token_hash",
    "vector_ad",
]
