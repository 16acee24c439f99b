"""Durable writes (issue 27, item 6): a writer killed at any point leaves the old file or the new
one, never a torn one; secrets are owner-only from their first byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fedmeta.sim.artifacts.durable import write_atomic

WRITER = """
import sys
from fedmeta.sim.artifacts.durable import write_atomic
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    write_atomic(path, (str(i % 10) * 4_000_000).encode())    # 4 MB of one digit: a torn file mixes two
"""


def test_a_writer_killed_mid_write_leaves_a_whole_file(tmp_path):
    path = tmp_path / "state.bin"
    write_atomic(path, b"0" * 4_000_000)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for kill_after in (0.05, 0.13, 0.21, 0.34, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = path.read_bytes()
        assert len(data) == 4_000_000 and data == data[:1] * len(data), "a torn file"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.bin"]
    assert all(n.startswith(".state.bin.") and n.endswith(".tmp") for n in leftovers)  # only a killed temp


def test_a_failed_rename_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomic(path, "old")

    def crash(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_secret_is_owner_only_and_durable_writes_fsync_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd))[1])
    path = write_atomic(tmp_path / "run_secret.key", b"k" * 32, 0o600)
    assert path.stat().st_mode & 0o777 == 0o600
    import stat

    assert any(stat.S_ISREG(m) for m in synced) and any(
        stat.S_ISDIR(m) for m in synced
    )  # the file, then its folder
