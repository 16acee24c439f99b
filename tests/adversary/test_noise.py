"""The DP noise an adversary could exploit (issue 26, item 5): every draw of a run with real
secrets comes from the CSPRNG through the attack-safe Gaussian, whose law is checked here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedmeta.sim.seeding import Secrets, SecureGaussian, gaussian_noise

pytestmark = pytest.mark.adversary


def test_the_secure_gaussian_is_standard_normal():
    """Kolmogorov-Smirnov and the first four moments over 200,000 draws (a fixed key: the test is
    deterministic; p > 0.01 is what a correct sampler gives 99% of keys)."""
    z = SecureGaussian(bytes(range(32))).standard(200_000)
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.015
    assert abs(stats.skew(z)) < 0.03 and abs(stats.kurtosis(z)) < 0.06


def test_its_draws_continue_one_stream_and_keys_are_independent():
    a = SecureGaussian(b"k" * 32)
    first, second = a.standard(1000), a.standard(1000)
    assert np.array_equal(first, SecureGaussian(b"k" * 32).standard(1000))  # the key says it all
    assert not np.array_equal(first, second)  # the stream goes on
    other = SecureGaussian(b"j" * 32).standard(1000)
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.12


@pytest.mark.parametrize("seeded", [False, True])
def test_every_noise_source_of_a_run_is_the_secure_one(seeded):
    """The aggregator's central and metric noise, clients' local DP-SGD noise: `Secrets.noise`
    gives the CSPRNG's Gaussian for a run with real secrets; only seeded runs (bit-exact replays,
    private against nobody holding the seed) keep torch's generator."""
    from fedmeta.actors.privacy import central_noise

    s = Secrets.seeded(1) if seeded else Secrets.fresh(1)
    for source in (
        s.derive("aggregator").noise("dp-noise", 3),
        s.derive("client", 0, 5).noise("local-dp-noise", 0, 5),
    ):
        assert isinstance(source, torch.Generator) == seeded and isinstance(source, SecureGaussian) != seeded
    noisy, m = central_noise(torch.zeros(50_000), 1.0, 2.0, s.derive("aggregator").noise("dp-noise", 0))
    assert m["noise_std"] == 2.0 and abs(float(noisy.std()) - 2.0) < 0.03
    again, _ = central_noise(torch.zeros(50_000), 1.0, 2.0, s.derive("aggregator").noise("dp-noise", 0))
    assert torch.equal(noisy, again)  # one stream per (party, round): resumable


def test_noise_is_not_one_float32_draw():
    """Mironov's attack reads the low bits of a single floating-point draw. The secure sampler
    returns, for each coordinate, (z1 + z2 + z3 + z4) / 2 computed in float64 from four
    independent normals: the test rebuilds that sum from the stream and finds it."""
    key = b"q" * 32
    got = gaussian_noise((8,), SecureGaussian(key), dtype=torch.float64)
    raw = SecureGaussian(key)
    u = raw._uniform(32)
    r = np.sqrt(-2.0 * np.log1p(-u[0::2]))
    normals = np.concatenate([r * np.cos(2 * np.pi * u[1::2]), r * np.sin(2 * np.pi * u[1::2])])
    assert np.allclose(got.numpy(), normals.reshape(4, 8).sum(0) / 2)
