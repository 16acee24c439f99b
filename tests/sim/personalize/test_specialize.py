"""Specialized members from a run: groups of similar individuals, pooled profiles, averaged models."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedmeta.sim.cli.main import app
from fedmeta.sim.config import ConfigError, from_dict
from fedmeta.sim.personalize.specialize import input_stats, pooled_profile
from fedmeta.sim.run.experiment import run_experiment
from tests.conftest import tiny_raw


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_pooled_profile_equals_the_union(sizes, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(rng.normal(), 1 + rng.random(), (n, 3)) for n in sizes]
    pooled = pooled_profile([input_stats(p) for p in parts])
    union = np.concatenate(parts)
    np.testing.assert_allclose(pooled["mean"], union.mean(0), atol=1e-9)
    np.testing.assert_allclose(pooled["var"], union.var(0), atol=1e-9)
    assert pooled["n"] == len(union)


def test_specialize_writes_servable_group_members(ray_session, tmp_path):
    from fedmeta.sim.checkpoint import load_model

    run_dir, _ = run_experiment(from_dict(tiny_raw(tmp_path, federation={"rounds": 2})))
    res = CliRunner().invoke(app, ["specialize", str(run_dir), "--groups", "2"])
    assert res.exit_code == 0, res.output
    paths = res.output.strip().splitlines()
    assert len(paths) == 2
    seen = []
    for p in paths:
        model, card = load_model(p)
        members = card["group"]["individuals"]
        seen += members
        expected = np.mean([np.load(run_dir / "personalized" / f"{i}.npy") for i in members], axis=0)
        got = np.concatenate([t.detach().numpy().ravel() for t in model.parameters()])
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert len(card["input_profile"]["mean"]) == 64 and 0 <= card["quality"]["acc_global_DI"] <= 1
    assert sorted(seen) == sorted(int(f.stem) for f in (run_dir / "personalized").glob("*.npy"))
    bad = CliRunner().invoke(app, ["specialize", str(run_dir), "--groups", "99"])
    assert isinstance(bad.exception, ConfigError) and "--groups: must be in 1..8" in str(bad.exception)
