"""Clusters that are not there: a one-line error within the timeout, never a hang."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmeta.sim.config import ConfigError
from fedmeta.sim.engine.cluster import cluster_target, wait_for_cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_which_address_is_tried(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_target(None) is None and cluster_target("local") is None
    assert (
        cluster_target("10.0.0.5:6379") == "10.0.0.5:6379"
        and cluster_target("ray://head:10001") == "head:10001"
    )
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert cluster_target(None) == "10.0.0.7:6379"


def test_waiting_ends_when_someone_listens_and_fails_in_time_when_nobody_does():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        wait_for_cluster(f"127.0.0.1:{s.getsockname()[1]}", 5.0)
    t0 = time.monotonic()
    port = free_port()
    with pytest.raises(
        ConfigError, match=rf"^ray.address: no Ray cluster answers at 127.0.0.1:{port} within 1 s"
    ):
        wait_for_cluster(f"127.0.0.1:{port}", 1.0)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="ray.address: expected host:port"):
        wait_for_cluster("nohost", 1.0)


def test_fedmeta_run_against_an_unreachable_address_exits_2_with_one_line(tmp_path):
    root = Path(__file__).resolve().parents[3]
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmeta",
            "run",
            "--address",
            f"127.0.0.1:{free_port()}",
            "--set",
            "ray.connect_timeout_s=2",
            "--set",
            f"run.out_dir={tmp_path}",
            "--no-progress",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and time.monotonic() - t0 < 60
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ray.address: no Ray cluster answers at 127.0.0.1:")


def test_a_checkout_ships_only_the_package_to_a_cluster():
    """From a checkout (editable install), `py_modules` gets a staged folder named `fedmeta` with
    the package's folders, not the checkout with its tests and .git."""
    import os

    from fedmeta.sim.engine.cluster import package_folder

    staged = Path(package_folder())
    assert staged.name == "fedmeta" and staged == Path(package_folder())  # staged once per process
    assert {"sim", "actors", "serve", "configs", "__init__.py"} <= set(os.listdir(staged))
    assert not {"tests", "docs", ".git", "pyproject.toml"} & set(os.listdir(staged))
