"""A `fedmeta run --address` on a real two-node Ray cluster (two raylets on this machine) whose
second node is killed mid-run. Run by tests/sim/engine/test_multinode.py in its own process (a test
session already holds a local Ray); prints one JSON line: the CLI's exit code and summary.

    python -m tests.sim.engine.two_node_run OUT_DIR CPUS_PER_WORKER RESTART_TIMEOUT_S
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ray.cluster_utils import Cluster

from tests.conftest import tiny_raw


def cluster_pids(cluster: Cluster) -> list[int]:
    return [
        p.process.pid
        for node in cluster.list_all_nodes()
        for procs in node.all_processes.values()
        for p in procs
        if p.process is not None
    ]


def main(out: Path, cpus_per_worker: float, restart_timeout_s: float) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    (out / "pids.json").write_text(json.dumps(cluster_pids(cluster)))  # for the test's clean-up
    raw = tiny_raw(out / "runs")
    raw["federation"]["rounds"] = 40
    raw["eval"]["every"] = 20
    raw["ray"] = {
        "num_workers": 4,
        "num_cpus_per_worker": cpus_per_worker,
        "restart_timeout_s": restart_timeout_s,
    }
    (out / "exp.yaml").write_text(yaml.safe_dump(raw))
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedmeta",
            "run",
            str(out / "exp.yaml"),
            "--address",
            cluster.address,
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not list((out / "runs").glob("*/checkpoint.pt")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the first round is done: now the second node goes
    cluster.remove_node(second, allow_graceful=False)
    stdout, stderr = run.communicate(timeout=400)
    summaries = list((out / "runs").glob("*/summary.json"))
    summary = json.loads(summaries[0].read_text()) if summaries else None
    print(json.dumps({"exit": run.returncode, "summary": summary, "stderr": stderr[-2000:]}))
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
