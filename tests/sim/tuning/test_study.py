"""`fedmeta study`: a grid of tiny experiments through Ray Tune's grid search (on the session's Ray,
2 CPUs), its table and plots, bad study files, repeats, and resuming a study."""

import json
import re
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedmeta.sim.cli.main import app, main
from fedmeta.sim.config import ConfigError
from fedmeta.sim.tuning.study import load_study
from fedmeta.sim.tuning.study_plots import METRICS, plot_study
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[3]
STUDY_2X2 = """
base: base.yaml
set: {federation.rounds: 2, eval.every: 2}
grid:
  federation.clients_per_round: [5, 10]
  secagg.enabled: [false, true]
"""


def write_study(folder: Path, text: str, **base_sections) -> Path:
    """base.yaml (the tiny experiment) and s.yaml (the study) in `folder`; the study goes to folder/studies."""
    base_sections.setdefault("ray", {"num_workers": 1})  # one worker actor per cell: trials start faster
    (folder / "base.yaml").write_text(yaml.safe_dump(tiny_raw(folder / "runs", **base_sections)))
    path = folder / "s.yaml"
    path.write_text(textwrap.dedent(text) + f"out_dir: {folder / 'studies'}\n")
    return path


def stdout_lines(output: str) -> list[str]:
    # Ray may forward trial processes' own lines ("(pid=...) ..."): not the CLI's output
    return [line for line in output.strip().splitlines() if not re.match(r"^(\x1b\[[0-9;]*m)?\(", line)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: base.yaml\nsteps: 3\ngrid: {federation.rounds: [1]}\n", "steps: unknown key"),
        (
            "base: base.yaml\ngrid: {federation.clients_per_round: []}\n",
            "grid.federation.clients_per_round: expected a non-empty list",
        ),
        (
            "base: base.yaml\ngrid: {federation.nope: [1, 2]}\n",
            "grid.federation.nope: not a key of the experiment config",
        ),
        (
            "base: base.yaml\ngrid: {federation.rounds: [2]}\nset: {algorithm.lrr: 0.1}\n",
            "set.algorithm.lrr: not a key of the experiment config",
        ),
        (
            "base: base.yaml\ngrid: {federation.clients_per_round: [10, 400]}\n",
            "grid.federation.clients_per_round: must be <= data.num_clients",
        ),
        (
            "base: base.yaml\ngrid: {federation.rounds: [2]}\nrepeats: 0\n",
            "repeats: Input should be greater than or equal to 1",
        ),
        ("base: nope.yaml\ngrid: {federation.rounds: [2]}\n", "base: no experiment file"),
    ],
)
def test_bad_study_files_give_one_line_errors_naming_the_key(tmp_path, text, message):
    path = write_study(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_exits_2_with_one_line_on_stderr(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, "base: base.yaml\ngrid: {federation.nope: [1]}\n")
    monkeypatch.setattr(sys, "argv", ["fedmeta", "study", str(path)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "grid.federation.nope: not a key" in err
    assert not (tmp_path / "studies").exists()  # nothing ran, nothing was written


def test_cells_are_every_combination_in_the_grids_order(tmp_path):
    study = load_study(write_study(tmp_path, STUDY_2X2 + "repeats: 2\n"))
    assert [tuple(c.values()) for c in study.cells][:3] == [(5, False, 3), (5, False, 4), (5, True, 3)]
    assert len(study.cells) == 8 and all(cfg.federation.rounds == 2 for cfg in study.configs)
    assert study.configs[-1].federation.clients_per_round == 10 and study.configs[-1].secagg.enabled


def test_plots_from_a_table_alone(tmp_path):
    """Strong scaling with its ideal line and the secure-aggregation plot, with error bars over
    seeds, from a made-up table (a missing metric is NaN)."""
    rows = [
        {
            "ray.num_workers": w,
            "secagg.neighbors": k,
            "seed": s,
            "run_dir": "-",
            **{m: np.nan for m in METRICS},
            "clients_per_s": 100.0 * w + s,
            "s_per_round": 1.0 / w,
        }
        for w in (1, 2, 4)
        for k in (None, 4)
        for s in (0, 1)
    ]
    paths = plot_study(pd.DataFrame(rows), tmp_path)
    assert sorted(p.name for p in paths) == ["secagg_overhead.png", "strong_scaling.png"]
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.fixture(scope="module")
def study_2x2(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    path = write_study(folder, STUDY_2X2)
    res = CliRunner().invoke(app, ["study", str(path), "--json"])
    assert res.exit_code == 0, res.output
    lines = stdout_lines(res.stdout)
    return path, Path(lines[-1]), json.loads(lines[-2])


@pytest.mark.slow
def test_a_2x2_study_gives_one_row_per_cell_with_every_column_and_the_plots(study_2x2):
    _, directory, out = study_2x2
    table = pd.read_parquet(directory / "study.parquet")
    assert list(table.columns) == [
        "federation.clients_per_round",
        "secagg.enabled",
        "seed",
        "run_dir",
        *METRICS,
    ]
    assert table[["federation.clients_per_round", "secagg.enabled"]].values.tolist() == [
        [5, False],
        [5, True],
        [10, False],
        [10, True],
    ]
    assert (table.seed == 3).all() and out["cells"] == 4 and len(out["rows"]) == 4
    assert table.clients_per_s.gt(0).all() and table.acc_personalized_DI.between(0, 1).all()
    for run_dir, cpr in zip(table.run_dir, table["federation.clients_per_round"]):
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["clients_per_round"] == cpr
    assert len(pd.read_csv(directory / "study.csv")) == 4
    assert (directory / "accuracy_vs_clients_per_round.png").is_file()
    assert (directory / "metrics_vs_secagg.enabled.png").is_file()
    assert (directory / "bytes_vs_clients_per_round.png").is_file() == table.bytes_up_per_client.notna().any()


@pytest.mark.slow
def test_study_report_replots_from_the_table(study_2x2):
    _, directory, _ = study_2x2
    for png in directory.glob("*.png"):
        png.unlink()
    res = CliRunner().invoke(app, ["study", "report", str(directory)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(directory)
    assert (directory / "accuracy_vs_clients_per_round.png").is_file()


@pytest.mark.slow
def test_rerunning_a_finished_study_restores_it_and_reruns_no_cell(study_2x2):
    path, directory, _ = study_2x2
    summaries = sorted((directory / "runs").glob("*/summary.json"))
    before = [p.stat().st_mtime_ns for p in summaries]
    res = CliRunner().invoke(app, ["study", str(path)])  # its directory holds its Tune experiment: restored
    assert res.exit_code == 0, res.output
    assert stdout_lines(res.stdout)[-1] == str(directory)
    assert [p.stat().st_mtime_ns for p in summaries] == before and len(summaries) == 4
    assert len(list((directory / "trials").glob("*/result.json"))) == 4
    assert len(pd.read_parquet(directory / "study.parquet")) == 4


@pytest.mark.slow
def test_repeats_give_a_seed_column(ray_session, tmp_path):
    path = write_study(
        tmp_path,
        "base: base.yaml\nset: {federation.rounds: 1, eval.every: 1}\n"
        "grid: {federation.clients_per_round: [10]}\nrepeats: 2\nname: seeds\n",
    )
    from fedmeta.sim.tuning.study import run_study

    directory = run_study(path)
    assert directory == tmp_path / "studies" / "seeds"
    table = pd.read_parquet(directory / "study.parquet")
    assert table.seed.tolist() == [3, 4] and table.run_dir.nunique() == 2


FLAKY_MODEL = '''
from pathlib import Path

from torch import nn


def mlp(input_shape, num_classes, width=8):
    """Fails for width 16 until the marker exists: a cell that errors, then succeeds on resume."""
    if width == 16 and not Path({marker!r}).exists():
        raise RuntimeError("width 16 is not ready")
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))
'''


@pytest.mark.slow
def test_a_failed_cell_is_finished_by_resume_and_the_finished_one_is_not_rerun(ray_session, tmp_path):
    marker = tmp_path / "ready"
    (tmp_path / "studymodels.py").write_text(FLAKY_MODEL.format(marker=str(marker)))
    path = write_study(
        tmp_path,
        "base: base.yaml\nset: {federation.rounds: 1, eval.every: 1}\ngrid: {model.kwargs.width: [8, 16]}\n",
        model={"kind": "custom", "target": "studymodels:mlp"},
    )
    res = CliRunner().invoke(app, ["study", str(path)])
    assert res.exit_code == 1
    directory = tmp_path / "studies" / "s"
    assert len(pd.read_parquet(directory / "study.parquet")) == 1  # the finished cell is kept
    first = next((directory / "runs").glob("width=8,*/summary.json"))
    mtime = first.stat().st_mtime_ns
    marker.touch()
    res = CliRunner().invoke(app, ["study", str(path), "--resume", str(directory)])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(directory / "study.parquet")
    assert table["model.kwargs.width"].tolist() == [8, 16] and table.acc_global_DI.notna().all()
    assert first.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_another_study_in_the_same_directory_is_refused(study_2x2):
    path, directory, _ = study_2x2
    other = path.with_name("s2.yaml")
    other.write_text(path.read_text().replace("[5, 10]", "[5, 20]") + "name: s\n")
    with pytest.raises(ConfigError, match="holds another study"):
        from fedmeta.sim.tuning.study import run_study

        run_study(other)


@pytest.mark.slow
def test_the_scaling_study_notebook_runs(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: None)
    nb = json.loads((ROOT / "notebooks" / "scaling_study.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "scaling_study.ipynb", "exec"), scope)
    assert len(scope["table"]) == 2 and scope["table"]["federation.clients_per_round"].tolist() == [5, 10]
    assert (tmp_path / "scaling" / "studies" / "cohorts" / "paper_figure.png").is_file()


def test_the_readme_study_file_is_valid():
    """README's 2x2 study (its figure is notebooks/figures/study_bytes_vs_clients_per_round.png)."""
    from pathlib import Path

    from fedmeta.sim.tuning.study import load_study

    study = load_study(Path(__file__).resolve().parents[3] / "notebooks" / "clients_x_secagg_study.yaml")
    assert len(study.cells) == 4
