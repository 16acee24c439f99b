"""The researcher's own model and data, as a new user brings them: a folder holding `mymodels.py`
(a residual MLP with LayerNorm), a Parquet file of 300 clients keyed by a `user` column and
`exp.yaml`; run from another folder with `fedmeta run`, and through `fedmeta.run` with each
algorithm a user expects."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedmeta
from fedmeta.sim.cli.main import app

MYMODELS = """
import math
from torch import nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, h):
        return h + self.fc(self.norm(h).relu())


def residual_mlp(input_shape, num_classes, width=32, depth=2):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                         *[Block(width) for _ in range(depth)], nn.LayerNorm(width), nn.Linear(width, num_classes))
"""

EXP = """
data:
  kind: table
  global_clients: 30
  table: {path: clients.parquet, client_column: user, label_column: label}
model:
  kind: custom
  target: "mymodels_byo:residual_mlp"
  kwargs: {width: 32, depth: 2}
algorithm: {name: fedavg, local_epochs: 2, batch_size: 16, lr: 0.05}
federation: {rounds: 12, clients_per_round: 20}
eval: {every: 12, num_individuals: 40, finetune_steps: 15, finetune_lr: 0.05}
privacy: {audit_canaries: 0}
ray: {num_workers: 2, num_cpus_per_worker: 0.5}
run: {name: byo, progress: false, checkpoint_every: 12}
"""


def clients_table(users: int = 300, seed: int = 0) -> pd.DataFrame:
    """Clients with their own label mix and feature offset (what personalization can learn)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(8, 12))
    parts = []
    for u in range(users):
        n = int(rng.integers(12, 40))
        y = rng.choice(8, size=n, p=rng.dirichlet(np.full(8, 0.3)))
        x = protos[y] + rng.normal(scale=0.5, size=12) + rng.normal(scale=1.2, size=(n, 12))
        part = pd.DataFrame(x, columns=[f"f{j}" for j in range(12)])
        part.insert(0, "user", f"user-{u:03d}")
        part["label"] = y
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    (folder / "mymodels_byo.py").write_text(textwrap.dedent(MYMODELS))
    clients_table().to_parquet(folder / "clients.parquet")
    (folder / "exp.yaml").write_text(
        EXP.replace("progress: false", f"progress: false, out_dir: {folder / 'runs'}")
    )
    return folder


@pytest.mark.slow
def test_fedmeta_run_from_another_folder_personalization_beats_the_global_model(
    ray_session, project, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the model module and the table are found next to exp.yaml
    res = CliRunner().invoke(app, ["run", str(project / "exp.yaml")])
    assert res.exit_code == 0, res.output
    summary = json.loads(next((project / "runs").glob("byo-*/summary.json")).read_text())
    assert summary["data"] == "table" and summary["num_clients"] == 270 and summary["compute"] == "vmap"
    assert summary["acc_personalized_DI"]["mean"] > summary["acc_global_DI"]["mean"] > 1 / 8


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedprox", "fedadam", "fedyogi", "ditto"])
def test_the_same_config_runs_every_algorithm_through_the_api(ray_session, project, tmp_path, algorithm):
    overrides = [
        f"algorithm.name={algorithm}",
        "federation.rounds=4",
        "eval.every=4",
        f"run.out_dir={tmp_path}",
    ]
    if algorithm in ("fedadam", "fedyogi"):
        overrides.append("algorithm.server_lr=0.01")  # adaptive server steps are per coordinate
    result = fedmeta.run(project / "exp.yaml", overrides=overrides)
    s = result.summary
    assert s["algorithm"] == algorithm and s["rounds"] == 4 and result.run_dir.parent == tmp_path
    assert 1 / 8 < s["acc_global_DI"]["mean"] <= 1 and 0 < s["acc_personalized_DI"]["mean"] <= 1
    assert s["personalization"] == ("ditto (lambda=0.1)" if algorithm == "ditto" else "fine-tuning")


@pytest.mark.slow
def test_the_bring_your_own_notebook_runs(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = json.loads((Path(__file__).resolve().parents[2] / "notebooks" / "bring_your_own.ipynb").read_text())
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "bring_your_own.ipynb", "exec"), scope)
    assert scope["summary"]["data"] == "table" and scope["summary"]["compute"] == "vmap"
    assert scope["ditto"]["algorithm"] == "ditto" and (tmp_path / "byo" / "runs").is_dir()
