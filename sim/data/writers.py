"""Federated handwriting: scikit-learn's 8x8 digits re-drawn by simulated writers.

Schneider & Vlachos, "Personalization of Deep Learning" (Sec. II, Fig. 1), name two ways individuals'
data differ, and this source simulates both:

- hidden factors: each writer has a style drawn once from (seed, stream, cid): rotation, shear (slant),
  scale, stroke thickness, offset and pixel-noise level, all multiplied by ``style_strength``. Samples
  of a class from one writer are therefore more alike than samples of that class across writers.
- class counts: with ``alpha`` set, each writer's label mix is Dirichlet(alpha) over the classes.

With ``flips`` the classes 10-19 are the horizontally and 20-29 the vertically flipped digits 0-9,
the 30-class task of the paper's NIST experiment (Sec. IV). The digit pool is split once per seed:
D_G writers draw base images from a held-out 20% of it, the federation from the other 80%.

Rendering is batched over every image of every requested writer (in chunks of 256 writers): one
``embedding_bag`` gathers base digits and blends stroke thickness, one ``affine_grid`` builds the
writers' warps and one ``grid_sample`` applies them, so a cohort of 1000 writers costs tens of
milliseconds on one core. Nothing is stored per writer: any writer is regenerated on demand.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data.base import (
    ClientData,
    FederatedDataset,
    check_cids,
    split_clients,
    split_order,
    train_size,
)
from fedmeta.sim.seeding import np_rng

BASE_SIZE = 8  # side of the scikit-learn digits
HELD_OUT = 0.2  # share of each digit's images reserved for D_G writers
NOISE_BANK = 1024  # seeded N(0, 1) images per dataset; each sample adds one, scaled by its writer's level
CHUNK = 256  # writers rendered per batch: bounded temporaries, which the allocator can reuse

# Style ranges at style_strength 1. Offsets are in pixels of the 8x8 digit.
MAX_ROTATION = math.radians(25.0)
MAX_SHEAR = 0.3
SCALE_RANGE = (0.8, 1.15)
MAX_THICKNESS = 0.5  # blend weight towards a 3x3 dilation (> 0) or erosion (< 0)
MAX_OFFSET_PX = 1.0
MAX_NOISE = 0.08  # std of the additive pixel noise
THICKNESS_JITTER = 0.15  # per-sample wobble of the writer's thickness

# D_G writers live in their own stream, so their ids never alias a federation writer's style
FED_STREAM, GLOBAL_STREAM = "writer", "global-writer"
STYLE_DIMS = 7  # uniforms per writer: rotation, shear, scale, thickness, dx, dy, noise
SAMPLE_DRAWS = 5  # uniforms per sample: label, base image, split key, thickness jitter, noise pattern


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's 1797 digits as ((1797, 8, 8) float32 in [0, 1], (1797,) int64 labels).

    Read straight from the file scikit-learn ships (the one `load_digits` parses): importing
    sklearn.datasets costs ~140 MB of RSS in every worker process, for a 300 KB table."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the writers dataset needs scikit-learn's digits: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (1797, 65): 64 pixels, label
    images = torch.from_numpy(table[:, :64].reshape(-1, 8, 8) / 16.0)
    return images, table[:, 64].astype(np.int64)


class _ClassPool:
    """Base images available to one group of writers, indexed by class for vectorized draws."""

    def __init__(self, bank_labels: np.ndarray, members: np.ndarray, num_classes: int):
        self.order = members[np.argsort(bank_labels[members], kind="stable")]  # bank ids grouped by class
        self.count = np.bincount(bank_labels[members], minlength=num_classes)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])

    def pick(self, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Bank ids of one image of class labels[...] each, chosen by uniforms u of the same shape."""
        count = self.count[labels]
        offset = np.minimum((u * count).astype(np.int64), count - 1)
        return self.order[self.start[labels] + offset]


class WritersDataset(FederatedDataset):
    def __init__(self, cfg: DataConfig, seed: int):
        w = cfg.writers
        self.seed = seed
        self.num_clients = cfg.num_clients
        self.num_classes = 30 if w.flips else 10
        self.input_shape = (1, w.image_size, w.image_size)
        self.samples = cfg.samples_per_client
        self.n_train = train_size(cfg.samples_per_client, cfg.train_fraction)
        self.global_clients = cfg.global_clients
        self.alpha = w.alpha
        self.strength = w.style_strength

        digits, labels = _digits()
        # the bank holds every class's images: digits, then their horizontal and vertical mirror images
        variants = [digits, digits.flip(-1), digits.flip(-2)] if w.flips else [digits]
        bank = torch.cat(variants)  # (1797 * variants, 8, 8)
        self.bank_size = len(bank)
        # stroke thickness is a property of the pen, so it acts on the digit before the affine style;
        # filtering the bank once turns a writer's thickness into a per-sample blend of two table rows
        dilated, eroded = _max3x3(bank), -_max3x3(-bank)
        self.table = torch.cat([bank, dilated, eroded]).flatten(1)  # (3 * bank, 64)
        bank_labels = np.concatenate([labels + 10 * k for k in range(len(variants))])
        fed, held_out = self._split_digits(labels, seed)

        def members(ids: np.ndarray) -> np.ndarray:
            # a mirrored image belongs to the same side of the split as its digit
            return np.concatenate([ids + len(labels) * k for k in range(len(variants))])

        self.fed_pool = _ClassPool(bank_labels, members(fed), self.num_classes)
        self.global_pool = _ClassPool(bank_labels, members(held_out), self.num_classes)
        self.noise_bank = torch.from_numpy(
            np_rng(seed, "writer-noise").standard_normal(
                (NOISE_BANK, w.image_size * w.image_size), dtype=np.float32
            )
        )  # (patterns, S*S)
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _split_digits(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Digit ids for (federation, D_G): a seeded 80/20 split within each digit, so both see every digit."""
        rng = np_rng(seed, "writers-pool")
        fed, held_out = [], []
        for d in range(10):
            ids = rng.permutation(np.flatnonzero(labels == d))
            k = max(1, round(HELD_OUT * len(ids)))
            held_out.append(ids[:k])
            fed.append(ids[k:])
        return np.sort(np.concatenate(fed)), np.sort(np.concatenate(held_out))

    # ------------------------------------------------------------------ public API
    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        cids = check_cids(cids, self.num_clients)
        out: list[ClientData] = []
        for lo in range(0, len(cids), CHUNK):
            chunk = cids[lo : lo + CHUNK]
            x, y = self._render(FED_STREAM, self.fed_pool, chunk)
            out += split_clients(chunk, x, y, self.n_train)
        return out

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._global is None:
            writers = list(range(self.global_clients))
            parts = [
                self._render(GLOBAL_STREAM, self.global_pool, writers[lo : lo + CHUNK])
                for lo in range(0, len(writers), CHUNK)
            ]
            # all samples of every D_G writer, no train/test split
            self._global = (
                torch.cat([x.flatten(0, 1) for x, _ in parts]),
                torch.cat([y.flatten() for _, y in parts]),
            )
        return self._global

    def styles(self, cids: Sequence[int]) -> np.ndarray:
        """Hidden factors of federation writers, (clients, 7).

        Columns: rotation (rad), shear, scale, thickness, dx and dy (pixels), noise std.
        """
        return self._style_params(self._draw(FED_STREAM, check_cids(cids, self.num_clients))[0])

    def global_styles(self) -> np.ndarray:
        """Hidden factors of the D_G writers, (global_clients, 7), laid out as in `styles`."""
        return self._style_params(self._draw(GLOBAL_STREAM, list(range(self.global_clients)))[0])

    # ------------------------------------------------------------------ sampling
    def _draw(self, stream: str, cids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Per-writer uniforms from the writer's own stream: (style (C, 7), samples (C, 5, n), mix (C, K))."""
        n, k = self.samples, self.num_classes
        style = np.empty((len(cids), STYLE_DIMS))
        draws = np.empty((len(cids), SAMPLE_DRAWS, n))
        mix = np.empty((len(cids), k)) if self.alpha is not None else None
        concentration = np.full(k, self.alpha if self.alpha is not None else 1.0)
        for i, cid in enumerate(cids):
            rng = np_rng(self.seed, stream, cid)
            style[i] = rng.random(STYLE_DIMS)  # drawn first: a writer's style ignores n and alpha
            if mix is not None:
                mix[i] = rng.dirichlet(concentration)
            draws[i] = rng.random((SAMPLE_DRAWS, n))
        return style, draws, mix

    def _style_params(self, u: np.ndarray) -> np.ndarray:
        """Map style uniforms (C, 7) to factors scaled by style_strength; strength 0 is the identity."""
        s = self.strength
        sym = 2.0 * u - 1.0  # uniforms on [-1, 1)
        lo, hi = np.log(SCALE_RANGE)
        return np.stack(
            [
                s * MAX_ROTATION * sym[:, 0],
                s * MAX_SHEAR * sym[:, 1],
                np.exp(s * (lo + (hi - lo) * u[:, 2])),
                np.clip(s * MAX_THICKNESS * sym[:, 3], -1.0, 1.0),
                s * MAX_OFFSET_PX * sym[:, 4],
                s * MAX_OFFSET_PX * sym[:, 5],
                s * MAX_NOISE * u[:, 6],
            ],
            axis=1,
        )

    def _labels(self, u: np.ndarray, mix: np.ndarray | None) -> np.ndarray:
        """Labels (C, n) from uniforms (C, n): uniform over classes, or inverse CDF of each writer's mix."""
        if mix is None:
            return np.minimum((u * self.num_classes).astype(np.int64), self.num_classes - 1)
        cdf = np.cumsum(mix, axis=1)[:, None, :-1]  # (C, 1, K-1); the last class takes the rest
        return (u[:, :, None] >= cdf).sum(-1)

    def _render(self, stream: str, pool: _ClassPool, cids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (C, n, 1, S, S) and labels (C, n) of the writers, samples already in train/test order."""
        style_u, draws, mix = self._draw(stream, cids)
        # reorder every per-sample draw by the seeded split permutation before rendering
        order = split_order(draws[:, 2])  # (C, n)
        draws = np.take_along_axis(draws, order[:, None, :], axis=2)  # (C, 5, n)
        labels = self._labels(draws[:, 0], mix)  # (C, n)
        style = torch.from_numpy(self._style_params(style_u)).float()  # (C, 7)

        # thickness: blend each base digit towards its dilation (t > 0) or erosion (t < 0) by |t|;
        # the writer's pen plus a little per-sample jitter, so no two samples share an exact stroke.
        # embedding_bag does the gather and the blend in one pass (advanced indexing is far slower).
        ids = torch.from_numpy(pool.pick(labels, draws[:, 1]).ravel())  # (C*n,) bank ids
        jitter = torch.from_numpy(2.0 * draws[:, 3] - 1.0).float() * (self.strength * THICKNESS_JITTER)
        thickness = (style[:, 3:4] + jitter).clamp_(-1.0, 1.0).view(-1)  # (C*n,)
        morph_ids = ids + self.bank_size * (1 + (thickness < 0).long())  # dilated or eroded row
        weight = thickness.abs_()
        x = F.embedding_bag(
            torch.stack([ids, morph_ids], 1),
            self.table,
            mode="sum",
            per_sample_weights=torch.stack([1.0 - weight, weight], 1),
        )  # (C*n, 64)
        x = x.view(*labels.shape, BASE_SIZE, BASE_SIZE)  # (C, n, 8, 8)

        x = self._warp(x, style)  # (C, n, 8, 8)
        size = self.input_shape[-1]
        if size != BASE_SIZE:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (C, n, S, S)
        # pixel noise: one bank pattern per sample, scaled by its writer's noise level
        pattern = torch.from_numpy(
            np.minimum((draws[:, 4] * NOISE_BANK).astype(np.int64), NOISE_BANK - 1)
        )  # (C, n)
        level = style[:, 6:7].expand(pattern.shape)  # (C, n)
        x += F.embedding_bag(
            pattern.view(-1, 1), self.noise_bank, mode="sum", per_sample_weights=level.reshape(-1, 1)
        ).view_as(x)
        return x.clamp_(0.0, 1.0).unsqueeze(2), torch.from_numpy(labels)

    @staticmethod
    def _warp(x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Apply each writer's affine style to all its images at once: (C, n, 8, 8) -> (C, n, 8, 8).

        A writer's samples ride along as channels of one grid_sample batch entry, so the sampling grid
        is computed once per writer rather than once per image.
        """
        rot, shear, scale = style[:, 0], style[:, 1], style[:, 2]
        cos, sin = torch.cos(rot), torch.sin(rot)
        # forward map A = rotation @ slant @ scale takes the digit to the page
        a = scale * cos
        b = scale * (cos * shear - sin)
        c = scale * sin
        d = scale * (sin * shear + cos)
        # affine_grid maps output to input coordinates, so it needs A^-1 and the inverse offset
        inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
        inv = inv / (a * d - b * c).view(-1, 1, 1)  # (C, 2, 2)
        offset = style[:, 4:6] * (2.0 / BASE_SIZE)  # pixels -> normalized coordinates, (C, 2)
        theta = torch.cat([inv, -(inv @ offset.unsqueeze(-1))], dim=2)  # (C, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (C, 8, 8, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _max3x3(z: torch.Tensor) -> torch.Tensor:
    """3x3 max filter (grey-level dilation) over the last two dims, as two separable 3-tap maxima.

    Padding with -inf makes border pixels take the max over their in-image neighbours only, so
    -_max3x3(-z) is the matching erosion.
    """
    p = F.pad(z, (1, 1), value=-math.inf)
    z = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    p = F.pad(z, (0, 0, 1, 1), value=-math.inf)
    return torch.maximum(torch.maximum(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])
