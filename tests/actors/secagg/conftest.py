"""Shared helpers for the secure-aggregation tests."""

from __future__ import annotations

import numpy as np
import pytest


def chi2_uniform_pvalue(values: np.ndarray, buckets: int) -> float:
    """p-value of Pearson's chi-square test that integer `values` in [0, buckets) are uniform."""
    from scipy.stats import chisquare  # scipy comes with scikit-learn

    counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=buckets)
    assert counts.shape == (buckets,)
    return float(chisquare(counts).pvalue)


@pytest.fixture
def chi2_pvalue():
    return chi2_uniform_pvalue
