"""The typer app in-process (on the session's Ray), and the notebook against a real run dir."""

import json
from pathlib import Path

import matplotlib
import pytest
import yaml
from typer.testing import CliRunner

from fedmeta.sim.cli.main import app
from fedmeta.sim.config import ConfigError
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tmp)))
    res = CliRunner().invoke(app, ["run", str(cfg), "--no-progress", "--set", "federation.rounds=2"])
    assert res.exit_code == 0, res.output
    return Path(res.output.strip().splitlines()[-1]), res.output


def test_run_prints_table_then_run_dir(finished_run):
    run_dir, output = finished_run
    assert (run_dir / "summary.json").is_file()
    assert "acc(D_I), personalized" in output and "acc(D_G), global model" in output
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2


def test_report(finished_run):
    run_dir, _ = finished_run
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0 and "acc(D_I), global model" in res.output


def test_resume_of_a_finished_run_is_a_no_op(finished_run):
    run_dir, _ = finished_run
    before = json.loads((run_dir / "summary.json").read_text())
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress"])
    assert res.exit_code == 0, res.output
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["acc_personalized_DI"] == before["acc_personalized_DI"]


def test_bench_json_last_line(ray_session):
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--workload",
            "w2",
            "--rounds",
            "1",
            "--json",
            "--set",
            "data.num_clients=60",
            "--set",
            "federation.clients_per_round=20",
            "--set",
            "ray.num_cpus_per_worker=0.5",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert (
        out["compute"] == out["path"] == "vmap"
        and out["clients_per_s"] > 0
        and out["s_per_round"] > 0
        and out["peak_rss_mib"] > 0
    )
    # MLP 64-128-30, batch 16: forward 2*16*(64*128 + 128*30); backward the weight gradients (as much
    # again) and layer 2's input gradient (layer 1's is not needed); 4 batches of a 64-sample client
    per_batch = 2 * 16 * (64 * 128 + 128 * 30) * 2 + 2 * 16 * 128 * 30
    assert out["train_mflop_per_client"] == pytest.approx(4 * per_batch / 1e6)
    assert out["sgemm_gflops"] > 0 and out["gflops"] == pytest.approx(
        out["train_mflop_per_client"] * 1e6 * out["clients_per_s"] / 1e9
    )


def test_notebook_runs_on_a_run_dir(finished_run, monkeypatch):
    run_dir, _ = finished_run
    matplotlib.use("Agg")
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: None)
    nb = json.loads((ROOT / "notebooks" / "explore_run.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]).replace(
            "run_dir = runs[-1].parent", f"run_dir = Path({str(run_dir)!r})"
        )
        exec(compile(src, "explore_run.ipynb", "exec"), scope)
    assert scope["summary"]["rounds"] == 2 and len(scope["last"]) == 8


def test_bench_secagg_reports_overhead(ray_session):
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--workload",
            "w2",
            "--rounds",
            "1",
            "--json",
            "--secagg",
            "--repeats",
            "2",
            "--set",
            "data.num_clients=60",
            "--set",
            "federation.clients_per_round=24",
            "--set",
            "ray.num_cpus_per_worker=0.5",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out["secagg"]) == {"k20", "complete", "k20_dropout10"} and out["secagg_overhead"] > 0
    assert len(out["plain_s_per_round_all"]) == len(out["secagg"]["k20"]["s_per_round_all"]) == 2
    # the medians of the alternating repeats are compared (for 2 repeats: the slower of each)
    plain, k20 = out["plain_s_per_round_all"], out["secagg"]["k20"]["s_per_round_all"]
    assert out["s_per_round"] == sorted(plain)[1] and out["secagg"]["k20"]["s_per_round"] == sorted(k20)[1]
    assert out["secagg_overhead"] == pytest.approx(sorted(k20)[1] / sorted(plain)[1])


def test_drift_eval_reports_delay_and_false_alarms():
    res = CliRunner().invoke(app, ["drift", "eval", "--kind", "new_writers", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out["detectors"]) == {"autoencoder", "isolation_forest", "ks_autoencoder"}
    for r in out["detectors"].values():
        (delay,) = r["detection_delay"]
        fa = r["false_alarm_rate"]
        assert delay is not None and delay <= 3 and fa["mean"] <= 0.15 and fa["interval"] is None
        assert fa["pooled_interval"][0] <= fa["pooled"] <= fa["pooled_interval"][1]
    bad = CliRunner().invoke(app, ["drift", "eval", "--kind", "sideways"])
    assert isinstance(bad.exception, ConfigError) and "--kind: expected rotation" in str(bad.exception)
