"""Prototypes: class prototype plus Gaussian noise, FEMNIST-shaped benchmark data."""

import time

import numpy as np
import pytest
import torch

from fedmeta.sim.config import DataConfig, PrototypesConfig
from fedmeta.sim.data import build_dataset


def prototypes(seed: int = 0, *, samples: int = 64, **params):
    cfg = DataConfig(
        kind="prototypes",
        num_clients=200,
        samples_per_client=samples,
        global_clients=3,
        prototypes=PrototypesConfig(**params),
    )
    return build_dataset(cfg, seed)


def test_defaults_are_femnist_shaped():
    ds = prototypes()
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 62
    assert ds.prototypes.shape == (62, 1, 28, 28)


def test_input_shape_and_classes_follow_the_config():
    ds = prototypes(input_shape=[3, 8, 8], num_classes=5)
    c = ds.client(0)
    assert c.x_train.shape == (45, 3, 8, 8) and c.y_train.max() < 5


def test_samples_are_their_prototype_plus_scaled_noise():
    ds = prototypes(samples=400, noise=0.5)
    c = ds.client(3)
    residual = c.x_train - ds.prototypes[c.y_train]
    assert residual.mean().abs() < 0.01 and residual.std().item() == pytest.approx(0.5, rel=0.02)
    quiet = prototypes(noise=0.0).client(3)
    assert torch.equal(quiet.x_train, ds.prototypes[quiet.y_train])


def test_labels_are_uniform_and_differ_between_clients():
    ds = prototypes(samples=2000, num_classes=4)
    a, b = ds.clients([0, 1])
    counts = np.bincount(torch.cat([a.y_train, a.y_test]), minlength=4)
    assert counts.min() > 400
    assert not torch.equal(a.y_train, b.y_train)


def test_prototypes_are_shared_by_clients_and_d_g():
    ds = prototypes(noise=0.0)
    gx, gy = ds.global_data()
    assert gx.shape == (3 * 64, 1, 28, 28)
    assert torch.equal(gx, ds.prototypes[gy])


def test_100_clients_generate_in_milliseconds():
    ds = prototypes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds.clients(range(100))  # warm-up
        start = time.perf_counter()
        ds.clients(range(100))
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 0.25  # a few ms; the bound only catches a lost vectorization
