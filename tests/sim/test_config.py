import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.sim import config as C

ROOT = Path(__file__).resolve().parents[2]


def err(raw) -> str:
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(raw)
    return str(e.value)


def test_defaults_and_quickstart_load():
    cfg = C.load()  # the built-in quickstart
    assert cfg.data.kind == "writers" and cfg.federation.rounds >= 1
    for name in ("bench_w1.yaml", "bench_w2.yaml"):
        C.load(ROOT / "configs" / name)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"federation": {"roundz": 3}}, "federation.roundz: unknown key"),
        ({"federation": {"rounds": "3"}}, "federation.rounds: Input should be a valid integer"),
        ({"federation": {"rounds": 0}}, "federation.rounds: Input should be greater than or equal to 1"),
        ({"algorithm": {"name": "sgd"}}, "algorithm.name:"),
        ({"data": {"kind": "femnist"}}, "data.femnist.path: required"),
        (
            {"data": {"num_clients": 5}, "federation": {"clients_per_round": 6}},
            "federation.clients_per_round: must be <=",
        ),
        ({"data": {"writers": {"alpha": -1}}}, "data.writers.alpha: Input should be greater than 0"),
        ({"nonsense": 1}, "nonsense: unknown key"),
        (
            {"privacy": {"mode": "distributed"}},
            "privacy.mode: 'distributed' noise is added under secure aggregation",
        ),
        ({"secagg": {"neighbors": 5}}, "secagg.neighbors: must be even"),
        (
            {"privacy": {"local_dp": True}, "ray": {"compute": "vmap"}},
            "ray.compute: local DP-SGD (privacy.local_dp) runs on the loop",
        ),
        (
            {"ray": {"path": "loop", "compute": "vmap"}},
            "ray.path: deprecated alias of ray.compute; give only ray.compute",
        ),
        ({"privacy": {"local_clip": 0}}, "privacy.local_clip: Input should be greater than 0"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_values_name_the_key(raw, expected):
    assert expected in err(raw)


def test_overrides_and_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("federation:\n  rounds: 2\n")
    assert C.load(p, ["federation.rounds=5", "data.writers.flips=true"]).federation.rounds == 5
    with pytest.raises(C.ConfigError, match="expected key.path=value"):
        C.load(p, ["federation.rounds"])
    p.write_text("federation: [unclosed\n")
    with pytest.raises(C.ConfigError, match=r"not valid YAML \(line"):
        C.load(p)
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(tmp_path / "missing.yaml")


def test_cli_exits_2_with_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("federation:\n  rounds: many\n")
    r = subprocess.run(
        [sys.executable, "-m", "fedmeta", "run", str(p)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "federation.rounds" in lines[0] and "Traceback" not in r.stderr
    assert "integer" in lines[0]


def test_cli_missing_femnist_path(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text(f"data:\n  kind: femnist\n  femnist:\n    path: {tmp_path / 'nope'}\n")
    r = subprocess.run(
        [sys.executable, "-m", "fedmeta", "run", str(p), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.femnist.path" in lines[0]


def test_cli_config_prints_the_resolved_config():
    from typer.testing import CliRunner

    from fedmeta.sim.cli.main import app

    res = CliRunner().invoke(app, ["config", "--set", "federation.rounds=7"])
    assert res.exit_code == 0
    again = C.from_dict(__import__("yaml").safe_load(res.output))
    assert again.federation.rounds == 7 and again == C.load(None, ["federation.rounds=7"])


def test_ray_path_is_a_deprecated_alias_of_ray_compute():
    with pytest.warns(FutureWarning, match="ray.path is deprecated"):
        cfg = C.from_dict({"ray": {"path": "loop"}})
    assert cfg.ray.compute == "loop" and "path" not in cfg.model_dump()["ray"]


def test_a_config_files_folder_holds_its_code_and_data(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    (project / "clients.csv").write_text("user,label,x\n")
    (project / "exp.yaml").write_text(
        "data: {kind: table, table: {path: clients.csv, client_column: user}}\n"
    )
    monkeypatch.chdir(elsewhere)
    cfg = C.load(project / "exp.yaml")
    assert cfg.run.code_paths == [str(project.resolve())]
    assert cfg.data.table.path == str(project.resolve() / "clients.csv")  # found next to the file
    (elsewhere / "clients.csv").write_text("user,label,x\n")
    assert C.load(project / "exp.yaml").data.table.path == "clients.csv"  # the working directory wins
    assert C.load("quickstart").run.code_paths == []  # presets bring no code
    absolute = C.with_absolute_paths(C.load(project / "exp.yaml"))
    assert absolute.data.table.path == str(elsewhere.resolve() / "clients.csv")


def test_table_config_errors_name_their_keys():
    for raw, expected in (
        ({"data": {"kind": "table"}}, "data.table.path: required when kind is 'table'"),
        (
            {
                "data": {
                    "kind": "table",
                    "table": {"path": "t.csv", "client_column": "u", "partition": {"alpha": 0.5}},
                }
            },
            "data.table.partition: only for tables without a client column",
        ),
        (
            {"data": {"kind": "table", "table": {"path": "t.csv", "colum": "u"}}},
            "data.table.colum: unknown key",
        ),
        ({"algorithm": {"ditto_lambda": -1.0}}, "algorithm.ditto_lambda: Input should be"),
    ):
        with pytest.raises(C.ConfigError) as e:
            C.from_dict(raw)
        assert str(e.value).startswith(f"config: {expected}"), str(e.value)


@pytest.mark.parametrize(
    "tune, privacy, message",
    [
        ({"objectives": [{"metric": "latency_ms"}]}, {}, "tune.objectives: .*two or more"),
        (
            {"objectives": [{"metric": "latency_ms"}, {"metric": "latency_ms"}]},
            {},
            "tune.objectives: each metric once",
        ),
        ({"sampler": "nsga2"}, {}, "tune.sampler: nsga2 is a multi-objective sampler"),
        (
            {"objectives": [{"metric": "acc_global_DI"}, {"metric": "epsilon"}]},
            {},
            "tune.objectives: epsilon needs differential privacy",
        ),
        (
            {"objectives": [{"metric": "acc_global_DI"}, {"metric": "mia_auc"}]},
            {"mia_audit": False},
            "tune.objectives: mia_auc is measured by the audit",
        ),
        ({"objectives": [{"metric": "acc_global_DI"}, {"metric": "speed"}]}, {}, r"tune.objectives.1.metric"),
        (
            {"params": [{"key": "model.hidden.3", "low": 8, "high": 64, "integer": True}]},
            {},
            "tune.params.0.key: 'model.hidden.3' is not a numeric key",
        ),
    ],
)
def test_tune_objectives_are_checked(tune, privacy, message):
    from tests.conftest import tiny_raw

    with pytest.raises(C.ConfigError, match=message):
        C.from_dict(tiny_raw(tune=tune, privacy={"audit_canaries": 0, **privacy}))


def test_tune_objective_directions_and_list_keys():
    from tests.conftest import tiny_raw

    cfg = C.from_dict(
        tiny_raw(
            tune={
                "objectives": [
                    {"metric": "acc_personalized_DI"},
                    {"metric": "latency_ms"},
                    {"metric": "mia_auc", "mode": "max"},
                ],
                "params": [{"key": "model.hidden.0", "low": 8, "high": 64, "integer": True}],
            }
        )
    )
    assert [o.direction for o in cfg.tune.objectives] == ["max", "min", "max"]
