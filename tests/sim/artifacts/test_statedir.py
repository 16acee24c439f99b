"""Secrets outside what users ship (issue 27, item 4): the run secret and the profile store's key
live in the per-user state directory under the run's id; run directories are owner-only."""

from __future__ import annotations

import shutil

import pytest

from fedmeta.sim.artifacts.rundir import SECRET_FILE, new_run_dir, run_secrets
from fedmeta.sim.artifacts.statedir import run_id, run_secrets_dir, state_dir, store_key_path
from fedmeta.sim.config import from_dict
from tests.conftest import tiny_raw


def test_the_state_directory_is_private_and_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_STATE_DIR", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state" and (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("FEDMETA_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "fedmeta"


def test_a_run_keeps_its_secret_outside_its_directory_and_a_copy_cannot_resume_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_STATE_DIR", str(tmp_path / "state"))
    cfg = from_dict(tiny_raw(tmp_path / "runs"))
    run_dir = new_run_dir(cfg)
    assert run_dir.stat().st_mode & 0o777 == 0o700
    first = run_secrets(cfg, run_dir, resume=False)
    assert not (run_dir / SECRET_FILE).exists() and [p.name for p in run_dir.iterdir()] == ["run_id"]
    secret = run_secrets_dir(run_dir, create=False) / SECRET_FILE
    assert secret.read_bytes() == first.key and secret.stat().st_mode & 0o777 == 0o600
    assert all(d.stat().st_mode & 0o777 == 0o700 for d in (secret.parent, secret.parent.parent))
    assert run_secrets(cfg, run_dir, resume=True).key == first.key  # resume finds it by the run id
    # the same directory shipped to another machine (another state directory): it has no secret there
    monkeypatch.setenv("FEDMETA_STATE_DIR", str(tmp_path / "other-machine"))
    copy = tmp_path / "copied"
    shutil.copytree(run_dir, copy)
    with pytest.warns(UserWarning, match="missing .*copy its folder"):
        assert run_secrets(cfg, copy, resume=True).key != first.key


def test_a_legacy_secret_in_the_run_directory_moves_out_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_STATE_DIR", str(tmp_path / "state"))
    cfg = from_dict(tiny_raw(tmp_path / "runs"))
    run_dir = new_run_dir(cfg)
    (run_dir / SECRET_FILE).write_bytes(b"s" * 32)
    assert run_secrets(cfg, run_dir, resume=True).key == b"s" * 32
    assert (
        not (run_dir / SECRET_FILE).exists()
        and (run_secrets_dir(run_dir) / SECRET_FILE).read_bytes() == b"s" * 32
    )


def test_store_keys_are_kept_by_run_or_by_database(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_STATE_DIR", str(tmp_path / "state"))
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    own = store_key_path(run_dir / "profiles.sqlite", run_dir)
    assert own.parent == tmp_path / "state" / "runs" / run_id(run_dir)
    shared = store_key_path(tmp_path / "shared.sqlite", None)
    assert (
        shared == store_key_path(tmp_path / "shared.sqlite", None) and shared.parent.parent.name == "stores"
    )
    (run_dir / "run_id").write_text("../../etc")
    with pytest.raises(ValueError, match="not a fedmeta run id"):
        run_id(run_dir)
