"""Artifacts are data (issue 27, item 1): a run directory, member checkpoint or Tune experiment
from someone else never imports or calls code it names unless the user says so for that load.

Before, a model card with `kind: custom` made `fedmeta serve` import and call its `target` with
card-controlled arguments (`subprocess:call` with input shape ["sh", "-c", "id > PWNED"] ran the
command), and `run --resume` / `specialize` read a config.yaml that could name a target and add
its own `run.code_paths`."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.config import ConfigError
from tests.conftest import tiny_raw

pytestmark = pytest.mark.adversary

# a module that leaves a mark the moment it is imported, and whose factory builds a valid model
PAYLOAD = textwrap.dedent("""
    from pathlib import Path
    Path("PWNED").write_text("imported")
    import torch

    def factory(input_shape, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, num_classes))
""")
PROFILE = {"mean": [0.0] * 4, "var": [1.0] * 4, "count": 10}


@pytest.fixture
def attacker_dir(tmp_path, monkeypatch):
    """The working directory holds the attacker's module, so an import would succeed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pwn_mod.py").write_text(PAYLOAD)
    sys.modules.pop("pwn_mod", None)
    yield tmp_path
    sys.modules.pop("pwn_mod", None)


def fedmeta(monkeypatch, capsys, *argv) -> tuple[int, str]:
    """`fedmeta ARGV` in this process: (exit code, stderr)."""
    from fedmeta.sim.cli.main import main

    monkeypatch.setattr(sys, "argv", ["fedmeta", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def custom_member(where: Path, target: str = "pwn_mod:factory", shape=(4,)) -> Path:
    n = 4 * 2 + 2
    return ckpt.save_member(
        where,
        {"kind": "custom", "target": target, "kwargs": {}},
        np.zeros(n, np.float32),
        list(shape),
        2,
        PROFILE,
    ).parent


def test_serve_refuses_a_card_that_names_code(attacker_dir, monkeypatch, capsys):
    member = custom_member(attacker_dir / "member")
    code, err = fedmeta(
        monkeypatch, capsys, "serve", str(member), "--write-config", str(attacker_dir / "s.yaml")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.target names code ('pwn_mod:factory')" in err and "--trust-code" in err
    assert not (attacker_dir / "PWNED").exists() and "pwn_mod" not in sys.modules
    with pytest.raises(ConfigError, match="model.target names code"):
        ckpt.load_model(member)


def test_the_subprocess_payload_is_refused_before_anything_runs(attacker_dir, monkeypatch, capsys):
    """The reported attack: subprocess:call with a shell command as the input shape. Refused at
    the card's types even with --trust-code (the shape is not a list of ints)."""
    member = custom_member(attacker_dir / "member", "subprocess:call", ["sh", "-c", "id > PWNED"])
    for extra in ([], ["--trust-code"]):
        code, err = fedmeta(
            monkeypatch, capsys, "serve", str(member), "--write-config", str(attacker_dir / "s.yaml"), *extra
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (attacker_dir / "PWNED").exists()
    assert "data_schema.input_shape: expected a list of positive ints" in err


def test_with_trust_code_the_users_own_model_loads(attacker_dir):
    """The user's say-so: the target is imported from the working directory and built."""
    member = custom_member(attacker_dir / "member")
    model, card = ckpt.load_model(member, trust_code=True)
    assert sum(p.numel() for p in model.parameters()) == card["model"]["n_params"]
    assert (attacker_dir / "PWNED").exists()  # it ran: that is what trusting means


def _run_dir(where: Path, **sections) -> Path:
    raw = tiny_raw(where, **sections)
    run_dir = where / "foreign-run"
    (run_dir / "personalized").mkdir(parents=True)
    np.save(run_dir / "personalized" / "0.npy", np.zeros(3, np.float32))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    return run_dir


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"model": {"kind": "custom", "target": "pwn_mod:factory", "hidden": [32]}}, "model.target"),
        ({"algorithm": {"name": "pwn_mod:Evil", "batch_size": 8, "lr": 0.1}}, "algorithm.name"),
    ],
)
@pytest.mark.parametrize("command", [["run", "--resume"], ["specialize"]])
def test_resume_and_specialize_refuse_a_config_that_names_code(
    attacker_dir, monkeypatch, capsys, sections, key, command
):
    run_dir = _run_dir(attacker_dir, **sections)
    code, err = fedmeta(monkeypatch, capsys, *command, str(run_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{key} names code" in err and "--trust-code" in err
    assert not (attacker_dir / "PWNED").exists()


def test_an_artifact_never_adds_where_code_is_imported_from(attacker_dir):
    """Even trusted, a run directory's run.code_paths are dropped: code comes from the user's
    working directory and PYTHONPATH only."""
    from fedmeta.sim.artifacts.rundir import resume_config

    run_dir = _run_dir(attacker_dir, run={"code_paths": [str(attacker_dir / "elsewhere")]})
    assert resume_config(run_dir).run.code_paths == []
    assert resume_config(run_dir, trust_code=True).run.code_paths == []
