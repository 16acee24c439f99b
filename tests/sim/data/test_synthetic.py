"""Synthetic(alpha, beta) of the FedProx paper."""

import numpy as np
import torch

from fedmeta.sim.config import DataConfig, SyntheticConfig
from fedmeta.sim.data import build_dataset


def synthetic(seed: int = 0, *, samples: int = 64, num_clients: int = 30, **params):
    cfg = DataConfig(
        kind="synthetic",
        num_clients=num_clients,
        samples_per_client=samples,
        global_clients=5,
        synthetic=SyntheticConfig(**params),
    )
    return build_dataset(cfg, seed)


def features(c) -> np.ndarray:
    return torch.cat([c.x_train, c.x_test]).numpy()


def test_shapes_follow_dim_and_num_classes():
    ds = synthetic(dim=12, num_classes=4)
    assert ds.input_shape == (12,) and ds.num_classes == 4
    c = ds.client(0)
    assert c.x_train.shape == (45, 12) and c.y_train.max() < 4


def test_feature_covariance_is_j_to_the_minus_1_2():
    x = features(synthetic(samples=4000, beta=0.0).client(2))
    var = x.var(axis=0)
    expected = np.arange(1, 61) ** -1.2
    assert np.allclose(var, expected, rtol=0.15)


def test_beta_spreads_the_devices_feature_means():
    def spread(beta):
        means = np.stack([features(c).mean(0) for c in synthetic(beta=beta).clients(range(20))])
        return means.mean(1).std()  # B_k ~ N(0, beta) shifts a device's whole mean vector

    assert spread(0.0) < 0.5 < 2.0 < spread(25.0)


def test_labels_come_from_a_per_device_linear_model():
    # argmax(W_k x + b_k): one device's labels are linearly separable, so least-squares one-vs-rest
    # on [x, 1] recovers most of them, while another device's model labels the same inputs differently
    ds = synthetic(samples=600, alpha=1.0, beta=0.0, dim=10, num_classes=3)
    a, b = ds.clients([0, 1])
    xa, ya = features(a), torch.cat([a.y_train, a.y_test]).numpy()
    design = np.c_[xa, np.ones(len(xa))]
    coef, *_ = np.linalg.lstsq(design, np.eye(3)[ya], rcond=None)
    assert ((design @ coef).argmax(1) == ya).mean() > 0.8
    assert not np.array_equal(ya, torch.cat([b.y_train, b.y_test]).numpy())


def test_global_data_comes_from_devices_outside_the_federation():
    ds = synthetic()
    gx, _ = ds.global_data()
    assert gx.shape == (5 * 64, 60)
    fed = torch.cat([t for c in ds.clients(range(5)) for t in (c.x_train, c.x_test)])
    assert torch.cdist(gx, fed).min() > 1e-4


def test_device_model_does_not_depend_on_samples_per_client():
    # the model and feature centre are drawn before the samples: more samples, same devices
    def centres(samples):
        return np.array([features(c).mean() for c in synthetic(samples=samples, beta=9.0).clients(range(10))])

    small, large = centres(20), centres(2000)
    assert small.std() > 1.0  # devices differ a lot...
    assert np.abs(small - large).max() < 0.3  # ...but each keeps its centre
