"""Writers: scikit-learn digits with per-writer hidden factors and label mixes (Schneider & Vlachos)."""

import time

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedmeta.sim.config import DataConfig, WritersConfig
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data.writers import WritersDataset


def writers(
    seed: int = 0,
    *,
    num_clients: int = 40,
    samples: int = 64,
    global_clients: int = 4,
    train_fraction: float = 0.7,
    **style,
) -> WritersDataset:
    cfg = DataConfig(
        kind="writers",
        num_clients=num_clients,
        samples_per_client=samples,
        global_clients=global_clients,
        train_fraction=train_fraction,
        writers=WritersConfig(**style),
    )
    return build_dataset(cfg, seed)


def all_samples(c) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([c.x_train, c.x_test]), torch.cat([c.y_train, c.y_test])


def digit_images() -> tuple[torch.Tensor, np.ndarray]:
    d = load_digits()
    return torch.from_numpy(d.images.astype(np.float32) / 16), d.target


def nearest_distance(images: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each image, the L-inf distance to the closest candidate."""
    return (images.flatten(1)[:, None] - candidates.flatten(1)[None]).abs().amax(-1).amin(1)


def test_images_are_in_unit_range():
    x, _ = all_samples(writers().client(3))
    assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert x.max() > 0.9  # strokes survive the style


def test_no_style_gives_the_plain_digits():
    digits, labels = digit_images()
    x, y = all_samples(writers(style_strength=0.0).client(0))
    for d in y.unique().tolist():
        assert nearest_distance(x[y == d, 0], digits[labels == d]).max() < 1e-5


def test_flips_add_mirrored_digits_as_classes_10_to_29():
    digits, labels = digit_images()
    ds = writers(style_strength=0.0, flips=True, samples=300)
    assert ds.num_classes == 30
    x, y = all_samples(ds.client(1))
    assert y.max() >= 20 and y.min() < 10  # all three groups occur
    for c in y.unique().tolist():
        group, d = divmod(c, 10)
        base = digits[labels == d]
        mirrored = [base, base.flip(-1), base.flip(-2)][group]
        assert nearest_distance(x[y == c, 0], mirrored).max() < 1e-5, f"class {c}"
        if group:  # a flipped class is not just its digit again (up to a few symmetric images)
            assert (nearest_distance(x[y == c, 0], base) > 1e-3).float().mean() > 0.5


def test_image_size_resizes():
    ds = writers(image_size=16)
    assert ds.input_shape == (1, 16, 16)
    c = ds.client(0)
    assert c.x_train.shape[1:] == (1, 16, 16) and c.x_train.min() >= 0 and c.x_train.max() <= 1
    assert ds.global_data()[0].shape == (4 * 64, 1, 16, 16)


def test_small_alpha_gives_few_classes_per_writer():
    def classes_per_writer(ds):
        return np.mean([len(all_samples(c)[1].unique()) for c in ds.clients(range(20))])

    assert classes_per_writer(writers(alpha=0.05)) < 3
    assert classes_per_writer(writers(alpha=None)) > 9
    mixes = [np.bincount(all_samples(c)[1], minlength=10) for c in writers(alpha=0.05).clients(range(20))]
    assert len({int(np.argmax(m)) for m in mixes}) > 3  # writers favour different classes


def test_style_differs_between_writers_more_than_within():
    ds = writers(samples=200)
    data = [all_samples(c) for c in ds.clients(range(6))]

    def mean_distance(a, b):
        return torch.cdist(a.flatten(1), b.flatten(1)).mean().item()

    within, between = [], []
    for d in range(10):
        per_writer = [x[y == d] for x, y in data]
        within += [mean_distance(p, p) for p in per_writer]
        between += [mean_distance(p, q) for i, p in enumerate(per_writer) for q in per_writer[i + 1 :]]
    assert np.mean(between) > 1.2 * np.mean(within)


def test_style_strength_scales_every_factor():
    assert np.allclose(writers(style_strength=0.0).styles(range(5)), [[0, 0, 1, 0, 0, 0, 0]] * 5)
    s = writers(num_clients=200).styles(range(200))
    rot, shear, scale, thick, dx, dy, noise = s.T
    assert np.abs(rot).max() <= np.radians(25) and np.abs(rot).max() > np.radians(20)
    assert np.abs(shear).max() <= 0.3 and scale.min() >= 0.8 and scale.max() <= 1.15
    assert (thick < 0).any() and (thick > 0).any() and np.abs(np.r_[dx, dy]).max() <= 1 and (noise >= 0).all()
    assert np.allclose(writers(num_clients=200, style_strength=0.5).styles(range(200))[:, 0], rot / 2)


def test_global_writers_have_their_own_styles_and_held_out_digits():
    ds = writers(num_clients=100, global_clients=10)
    fed, glob = ds.styles(range(100)), ds.global_styles()
    assert not (fed[:, None, :] == glob[None, :, :]).all(-1).any()
    # the federation and D_G draw from disjoint 80/20 parts of the digit pool, covering every class
    fed_ids, glob_ids = set(ds.fed_pool.order), set(ds.global_pool.order)
    assert not fed_ids & glob_ids and len(fed_ids | glob_ids) == 1797
    assert len(glob_ids) == pytest.approx(0.2 * 1797, abs=10)
    assert (ds.global_pool.count > 0).all() and (ds.fed_pool.count > 0).all()


def test_global_data_uses_only_held_out_digits():
    digits, labels = digit_images()
    ds = writers(style_strength=0.0, global_clients=6)
    gx, gy = ds.global_data()
    held_out = digits[ds.global_pool.order]
    assert nearest_distance(gx[:, 0], held_out).max() < 1e-5
    fed_x = torch.cat([all_samples(c)[0] for c in ds.clients(range(10))])
    assert nearest_distance(fed_x[:, 0], held_out).min() > 1e-3


def test_a_writer_keeps_its_style_when_more_samples_are_drawn():
    assert np.array_equal(writers(samples=10).styles([5]), writers(samples=100, alpha=0.3).styles([5]))


def test_a_cohort_of_1000_writers_renders_fast():
    ds = writers(num_clients=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds.clients(range(1000))  # warm-up: allocator, kernels
        start = time.perf_counter()
        ds.clients(range(1000))
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 1.0  # ~0.1 s on one core; the bound only catches a lost vectorization


def test_digits_table_matches_sklearn_load_digits():
    from sklearn.datasets import load_digits

    from fedmeta.sim.data.writers import _digits

    images, labels = _digits()
    ref = load_digits()
    np.testing.assert_allclose(images.numpy(), ref.images / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(labels, ref.target)
