"""ProfileStoreActor: the profile store as a thin Ray actor, so that one process owns the database
file; ``ray`` is imported here only, not by the store itself.
"""

from __future__ import annotations

import ray

from fedmeta.actors.profile_store.store import ProfileStore


@ray.remote(num_cpus=0)
class ProfileStoreActor(ProfileStore):
    """Thin Ray actor over ProfileStore: one process owns the database file. Prefer `key_file=` to
    `master_key=` here, since actor constructor arguments travel through Ray's control plane."""
