"""The Pareto front of a multi-objective search (sim/metrics.py): properties and a loop reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.metrics import pareto_front


def dominates(a, b, directions):
    better_or_equal = all((x >= y) if d == "max" else (x <= y) for x, y, d in zip(a, b, directions))
    strictly = any((x > y) if d == "max" else (x < y) for x, y, d in zip(a, b, directions))
    return better_or_equal and strictly


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 25),
    st.lists(st.sampled_from(["max", "min"]), min_size=1, max_size=4),
    st.integers(0, 2**31),
)
def test_front_is_exactly_the_non_dominated_rows(n, directions, seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 4, size=(n, len(directions))).astype(
        float
    )  # small integers: ties and duplicates
    front = set(pareto_front(points, directions).tolist())
    reference = {
        i for i in range(n) if not any(dominates(points[j], points[i], directions) for j in range(n))
    }
    assert front == reference and front  # a finite set always has a non-dominated point


def test_directions_and_nan():
    pts = np.array([[0.9, 5.0], [0.8, 1.0], [0.7, 2.0], [np.nan, 0.1]])
    assert pareto_front(pts, ["max", "min"]).tolist() == [0, 1]  # (0.7, 2) is dominated by (0.8, 1)
    assert pareto_front(pts, ["min", "max"]).tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"points must be \(trials, 3\)"):
        pareto_front(pts, ["max", "min", "min"])
