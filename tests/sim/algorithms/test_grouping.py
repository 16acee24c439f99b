"""Data grouping: the auto-encoder space, single-sample and individual grouping."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.algorithms.grouping import (
    class_mean_latents,
    encode,
    individual_group,
    single_sample_group,
    train_autoencoder,
)
from fedmeta.sim.data.writers import _digits


def test_class_mean_latents_against_a_loop():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(20, 4, generator=g), torch.tensor([0, 1, 1, 3] * 5)
    got = class_mean_latents(z, y, 5).view(5, 4)
    for c in range(5):
        expected = z[y == c].mean(0) if (y == c).any() else z.mean(0)  # class 2 and 4 absent
        torch.testing.assert_close(got[c], expected)


@settings(max_examples=30, deadline=None)
@given(n_i=st.integers(1, 12), n_g=st.integers(1, 80), frac=st.floats(0.01, 1.0), seed=st.integers(0, 100))
def test_single_sample_group_distinct_and_nearest_first(n_i, n_g, frac, seed):
    g = torch.Generator().manual_seed(seed)
    zi, zg = torch.randn(n_i, 3, generator=g), torch.randn(n_g, 3, generator=g)
    n = max(1, int(frac * n_g))
    picked = single_sample_group(zi, zg, n)
    assert len(picked) == n and len(set(picked.tolist())) == n
    # the first pick is the global sample nearest to the first individual sample
    assert picked[0] == int(torch.cdist(zi[:1], zg).argmin())


def test_single_sample_group_picks_each_samples_neighbourhood():
    """Two tight clusters in D_G; each individual sample takes its own cluster's members."""
    zg = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [10, 10], [10.1, 10], [10, 10.1]])
    zi = torch.tensor([[10.0, 10.05], [0.05, 0.0]])
    picked = single_sample_group(zi, zg, 6)
    assert set(picked[:3].tolist()) == {3, 4, 5} and set(picked[3:].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="n: SG needs"):
        single_sample_group(zi, zg, 7)


def test_individual_grouping_finds_the_truly_similar_individuals():
    """Individuals 0-3 write digits shifted right, 4-7 inverted (1 - x); an unseen shifted-right
    individual must be grouped with 0-3, through an auto-encoder trained on a mix of both."""
    images, labels = _digits()
    x, y = images.unsqueeze(1), torch.from_numpy(labels)
    rng = np.random.default_rng(0)
    styles = (
        [lambda t: torch.roll(t, 2, dims=-1)] * 4
        + [lambda t: 1 - t] * 4
        + [lambda t: torch.roll(t, 2, dims=-1)]
    )
    people = []
    for style in styles:
        idx = torch.from_numpy(rng.choice(len(y), 80, replace=False))
        people.append((style(x[idx]), y[idx]))
    mix = torch.cat([p[0] for p in people[:8]])
    ae = train_autoencoder(mix, 16, epochs=15, lr=3e-3, batch_size=64, gen=torch.Generator().manual_seed(0))
    vectors = {i: class_mean_latents(encode(ae, px), py, 10) for i, (px, py) in enumerate(people)}
    assert sorted(individual_group(vectors[8], vectors, 4, exclude=8)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n: IG needs"):
        individual_group(vectors[8], vectors, 9, exclude=8)


def test_autoencoder_is_reproducible_and_learns():
    x = _digits()[0][:300].unsqueeze(1)
    a = train_autoencoder(x, 16, 3, 3e-3, 64, torch.Generator().manual_seed(1))
    b = train_autoencoder(x, 16, 3, 3e-3, 64, torch.Generator().manual_seed(1))
    torch.testing.assert_close(encode(a, x), encode(b, x))
    with torch.no_grad():
        assert (a(x) - x).pow(2).mean() < x.var()  # better than predicting the mean image
