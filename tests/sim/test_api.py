"""`import fedmeta`: the Python API, your own algorithm by import path, presets from any folder,
and a wheel that claims no generic top-level name."""

import subprocess
import sys
import textwrap

import pytest

import fedmeta
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.config import AlgorithmConfig, ConfigError, from_dict
from tests.conftest import tiny_raw

MY_ALGORITHM = '''
import fedmeta


class SignSGD(fedmeta.Algorithm):
    """Local steps along the sign of the gradient; the server averages as FedAvg."""
    name = "signsgd"

    def step(self, ops, params, batches):
        (x, y, m), = batches
        g, loss = ops.grad(params, x, y, m)
        return ops.descend(params, {k: v.sign() for k, v in g.items()}, self.cfg.lr), loss
'''


def test_the_api_surface():
    assert fedmeta.__version__ and "quickstart" in fedmeta.presets()
    cfg = fedmeta.load_config("quickstart", overrides=["federation.rounds=3"])
    assert cfg.federation.rounds == 3 and cfg.data.num_clients == 2000
    same = fedmeta.load_config(cfg.model_dump(mode="json"), overrides=["data.writers.alpha=0.9"])
    assert same.data.writers.alpha == 0.9 and cfg.data.writers.alpha == 0.5  # the input is not changed
    with pytest.raises(ConfigError, match="federation.rounds: Input should be greater"):
        fedmeta.load_config({"federation": {"rounds": 0}})
    with pytest.raises(ConfigError, match="nor a preset: "):
        fedmeta.load_config("no-such-preset")


def test_your_own_algorithm_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "myalgos.py").write_text(textwrap.dedent(MY_ALGORITHM))
    monkeypatch.chdir(tmp_path)  # found in the working directory
    alg = build_algorithm(AlgorithmConfig(name="myalgos:SignSGD"))
    assert isinstance(alg, fedmeta.Algorithm) and alg.name == "signsgd"
    with pytest.raises(ConfigError, match="^algorithm.name: cannot import 'myalgos:Nope'"):
        build_algorithm(AlgorithmConfig(name="myalgos:Nope"))
    with pytest.raises(
        ConfigError, match="^algorithm.name: 'textwrap:dedent' is not a subclass of fedmeta.Algorithm"
    ):
        build_algorithm(AlgorithmConfig(name="textwrap:dedent"))
    with pytest.raises(ConfigError, match="algorithm.name: expected one of fedavg"):
        from_dict({"algorithm": {"name": "not a target"}})


@pytest.mark.slow
def test_fedmeta_run_with_your_own_algorithm(ray_session, tmp_path, monkeypatch):
    """The module sits in the working directory: the driver imports it from there, and so do the
    worker and aggregator actors (they are given the driver's working directory)."""
    (tmp_path / "myalgos_run.py").write_text(textwrap.dedent(MY_ALGORITHM))
    monkeypatch.chdir(tmp_path)
    result = fedmeta.run(
        tiny_raw(tmp_path, algorithm={"name": "myalgos_run:SignSGD", "lr": 0.01}),
        overrides=["federation.rounds=2", "eval.every=2"],
    )
    assert result.summary["algorithm"] == "myalgos_run:SignSGD" and result.summary["rounds"] == 2
    assert (result.run_dir / "summary.json").is_file() and 0 <= result.summary["acc_personalized_DI"][
        "mean"
    ] <= 1


def test_the_installed_package_claims_one_import_name_and_finds_presets_anywhere(tmp_path):
    """Outside the checkout, only `fedmeta` imports: the design's folders are its subpackages."""
    code = (
        "import importlib.util as u, fedmeta.sim.config as c; "
        "assert [n for n in ('sim', 'actors', 'serve', 'configs') if u.find_spec(n)] == []; "
        "import fedmeta.actors.aggregator, fedmeta.serve.auth; print(c.load('quickstart').run.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "quickstart"


MY_MODELS = """
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(torch.relu(self.norm(x)))


def resmlp(input_shape, num_classes, width=32, blocks=2):
    n = 1
    for d in input_shape:
        n *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n, width), *[Residual(width) for _ in range(blocks)],
                         nn.Linear(width, num_classes))


class Stateful(nn.Module):          # data-dependent Python control flow: torch.func cannot vmap it
    def __init__(self, n, k):
        super().__init__()
        self.fc = nn.Linear(n, k)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x) if float(x.sum()) >= 0 else -self.fc(x)


def stateful(input_shape, num_classes):
    return Stateful(64, num_classes)


def batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))


def not_a_module(input_shape, num_classes):
    return "model"
"""


def test_your_own_model_is_checked_and_runs_on_the_right_cohort_engine(tmp_path, monkeypatch):
    from fedmeta.sim.engine.plan import FederationPlan

    (tmp_path / "mymodels.py").write_text(textwrap.dedent(MY_MODELS))
    monkeypatch.chdir(tmp_path)

    def plan(target, **kwargs):
        return FederationPlan.from_config(
            from_dict(tiny_raw(model={"kind": "custom", "target": target, "kwargs": kwargs}))
        )

    p = plan("mymodels:resmlp", width=16, blocks=3)
    assert p.compute == "vmap" and p.n_params == len(p.init_params)
    assert plan("mymodels:stateful").compute == "loop"
    for target, message in (
        ("mymodels:batchnorm", "model.target: the module has buffers (2.running_mean"),
        ("mymodels:not_a_module", "model.target: mymodels:not_a_module returned str, not a"),
        ("mymodels:nope", "model.target: cannot import 'mymodels:nope'"),
    ):
        with pytest.raises(ConfigError) as e:
            plan(target)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.target: kind 'custom' needs 'package.module:factory'"):
        from_dict({"model": {"kind": "custom"}})


@pytest.mark.slow
def test_fedmeta_run_with_your_own_model(ray_session, tmp_path, monkeypatch):
    (tmp_path / "mymodels_run.py").write_text(textwrap.dedent(MY_MODELS))
    monkeypatch.chdir(tmp_path)
    result = fedmeta.run(
        tiny_raw(
            tmp_path, model={"kind": "custom", "target": "mymodels_run:resmlp", "kwargs": {"width": 16}}
        ),
        overrides=["federation.rounds=4", "eval.every=4", "algorithm.local_epochs=3"],
    )
    s = result.summary
    assert s["compute"] == "vmap" and s["model"] == "custom"
    assert s["personalization_gain"] > 0 and s["rounds"] == 4  # the personalized models beat the global one


def test_the_lock_pins_every_declared_dependency_and_refreshes_in_one_command():
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lock = {
        re.split(r"[=@ ]", line)[0].lower().replace("_", "-"): line
        for line in (root / "requirements/lock.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    for req in declared:
        name = re.split(r"[<>=\[ ;]", req)[0].lower().replace("_", "-")
        assert name in lock and "==" in lock[name], f"{name} is not pinned in requirements/lock.txt"
    assert project["optional-dependencies"]["fresh"] == ["fedmeta[test]"]
    assert "bash requirements/refresh.sh" in (root / "requirements/lock.txt").read_text()
    r = subprocess.run(["bash", "-n", str(root / "requirements/refresh.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
