"""Shaping schedules (Algorithm 1 of Schneider & Vlachos) and the partial-SGD client rule."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.algorithms.local import train_loop
from fedmeta.sim.algorithms.shaping import (
    PartialSGD,
    baseline,
    early_shaping,
    last_layer_names,
    sample_weighing,
    transfer,
    weighed_sources,
)
from fedmeta.sim.config import AlgorithmConfig, ModelConfig
from fedmeta.sim.models import build_model, flatten, init_params, param_shapes, unflatten


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    "n_period, expected", [(2, "GIGIGI"), (3, "GGIGGI"), (0.5, "IGIGIG"), (1 / 3, "IIGIIG"), (1, "IIIIII")]
)
def test_weighed_sources_follow_algorithm_1_line_5(n_period, expected):
    assert weighed_sources(n_period, 6) == expected


@settings(max_examples=40, deadline=None)
@given(
    n_g=st.integers(1, 60),
    n_i=st.integers(1, 20),
    bs=st.integers(1, 8),
    epochs=st.integers(1, 3),
    period=st.sampled_from([0.25, 0.5, 1.0, 2.0, 12.0]),
)
def test_sample_weighing_plan(n_g, n_i, bs, epochs, period):
    plan = sample_weighing(period, n_g, n_i, bs, epochs, rng())
    iterations = epochs * math.ceil(n_g / bs)
    assert len(plan.batches) == len(plan.sources) == iterations
    for b, s in zip(plan.batches, plan.sources):
        lo, hi = (n_g, n_g + n_i) if s == "I" else (0, n_g)
        assert len(b) and lo <= b.min() and b.max() < hi


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 30),
    n_g=st.integers(1, 50),
    n_i=st.integers(1, 20),
    bs=st.integers(1, 8),
    epochs=st.integers(1, 3),
)
def test_early_shaping_is_n_device_batches_then_epochs_over_dg(n, n_g, n_i, bs, epochs):
    plan = early_shaping(n, n_g, n_i, bs, epochs, rng())
    assert plan.sources == "I" * n + "G" * (epochs * math.ceil(n_g / bs))
    assert all(b.min() >= n_g for b in plan.batches[:n])
    seen = np.concatenate(plan.batches[n:])
    np.testing.assert_array_equal(
        np.sort(seen), np.repeat(np.arange(n_g), epochs)
    )  # each D_G sample once per epoch
    assert plan.transfers == (2 if n else 0)


def test_transfer_and_baseline_plans():
    tl = transfer(7, 100, 10, 4, rng())
    assert (
        tl.sources == "I" * 7
        and tl.transfers == 1
        and all(100 <= b.min() and b.max() < 110 for b in tl.batches)
    )
    base = baseline(30, 10, 8, 2, rng())
    np.testing.assert_array_equal(np.sort(np.concatenate(base.batches)), np.repeat(np.arange(40), 2))
    assert base.transfers == 0


def test_last_layer_names():
    names = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    assert last_layer_names(names, 1) == {"5.weight", "5.bias"}
    assert last_layer_names(names, 2) == {"3.weight", "3.bias", "5.weight", "5.bias"}
    with pytest.raises(ValueError, match="last_layers: must be in 1..3"):
        last_layer_names(names, 4)


def test_partial_sgd_moves_only_the_last_layers():
    model = build_model(ModelConfig(kind="mlp", hidden=[16, 16]), (1, 8, 8), 5)
    start = init_params(model, torch.Generator().manual_seed(0))
    shapes = param_shapes(model)
    keep = last_layer_names(list(shapes), 1)
    rule = PartialSGD(AlgorithmConfig(lr=0.5, batch_size=4), keep)
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 5, (12,))
    plan = transfer(6, 0, 12, 4, rng())
    out, _ = train_loop(model, rule.step, start, [x], [y], [[plan.batches]], 4)
    before, after = unflatten(start, shapes), unflatten(out[0], shapes)
    for k in shapes:
        assert torch.equal(before[k], after[k]) == (k not in keep), k
    assert not torch.equal(flatten(before), flatten(after))
