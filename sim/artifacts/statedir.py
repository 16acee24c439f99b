"""Where a run's secrets live: a per-user state directory outside every run directory.

A run directory is what users copy to a serving host, back up and share; a secret inside it
travels with it. So the run secret (run_secret.key) and the profile store's master key
(profiles.key) live under `$FEDMETA_STATE_DIR` (default `$XDG_STATE_HOME/fedmeta`, else
`~/.local/state/fedmeta`), in `runs/<run id>/`, files 0600 in 0700 folders. The run directory
holds only its run id (`run_id`, not a secret). A copied run directory serves, but cannot resume
with the same secret streams or decrypt its profile store on a machine without that folder;
moving a run with its secrets means copying `runs/<run id>/` to the other machine's state
directory as well."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from fedmeta.sim.artifacts.durable import write_atomic

RUN_ID = "run_id"  # in the run directory: the key of its secrets in the state directory


def state_dir() -> Path:
    """The per-user state directory (created 0700)."""
    env = os.environ.get("FEDMETA_STATE_DIR")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        root = Path(base) / "fedmeta"
    return private_dir(root)


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (0700, also when it existed)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def run_id(run_dir: Path, create: bool = True) -> str | None:
    """The run's id from its directory, or a new random one written there (None: none and not
    `create`)."""
    path = Path(run_dir) / RUN_ID
    if path.is_file():
        value = path.read_text().strip()
        if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
            return value
        raise ValueError(f"{path}: not a fedmeta run id (32 hex digits)")
    if not create:
        return None
    value = secrets.token_hex(16)
    write_atomic(path, value + "\n")
    return value


def run_secrets_dir(run_dir: Path, create: bool = True) -> Path | None:
    """The state-directory folder of this run's secrets (None: the run has no id and not `create`)."""
    rid = run_id(run_dir, create)
    if rid is None:
        return None
    runs = state_dir() / "runs"
    return private_dir(private_dir(runs) / rid) if create else runs / rid


def store_key_path(db: Path, run_dir: Path | None) -> Path:
    """Where the master key of the profile store `db` lives: with the run's secrets when the store
    is the run's, else under a folder named for the store's absolute path."""
    if run_dir is not None:
        return run_secrets_dir(run_dir) / "profiles.key"
    name = hashlib.sha256(str(Path(db).resolve()).encode()).hexdigest()[:32]
    return private_dir(private_dir(state_dir() / "stores") / name) / "profiles.key"
