"""A real multi-node cluster (two raylets on this machine, `ray.cluster_utils.Cluster`): a run
submitted with `--address` survives losing its second node. With room left on the first node the
lost workers come back there; without it the pool shrinks to what is left."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def kill_by_pid(pids_file: Path) -> None:
    if pids_file.is_file():
        for pid in json.loads(pids_file.read_text()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.parametrize("cpus_per_worker, restart_timeout_s, dropped", [(0.5, 90, 0), (1.0, 8, 2)])
def test_losing_the_second_node_mid_run_still_ends_with_a_full_summary(
    tmp_path, cpus_per_worker, restart_timeout_s, dropped
):
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.sim.engine.two_node_run",
                str(tmp_path),
                str(cpus_per_worker),
                str(restart_timeout_s),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        kill_by_pid(tmp_path / "pids.json")  # the cluster's own processes, whatever happened
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["exit"] == 0, res["stderr"]
    s = res["summary"]
    assert s["rounds"] == 40 and 0 <= s["acc_global_DI"]["mean"] <= 1
    assert s["worker_failures"] >= 1 and s["workers_dropped"] == dropped
