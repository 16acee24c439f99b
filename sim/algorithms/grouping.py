"""Data grouping: enlarge an individual's data with similar data, found in an auto-encoder's space.

Schneider & Vlachos, "Personalization of Deep Learning" (Sec. III, Fig. 3, Algorithm 1, lines 11-20):
  SG(n)  single-sample grouping: for each sample of D_I, its nearest samples of D_G (L2 distance of
         auto-encoder latents), without duplicates, n samples in all;
  IG(n)  individual grouping: the n individuals whose concatenated class-mean latents are nearest
         to the individual's.
The auto-encoder is trained on D_G (the server's data). Federated reading: the server ships the
encoder; a device sends only latents (SG) or its class-mean latents, an aggregated vector, to the
profile store (IG); raw samples never leave it. The chosen group then trains with the individual
as FedSGD would (each member's gradient on its own batch, averaged), which equals a step on the
pooled batch, so the simulator pools the group's batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedmeta.sim.models import init_params


class AutoEncoder(nn.Module):
    """MLP auto-encoder with a `latent`-dimensional code (the paper's has 16), inputs in [0, 1]."""

    def __init__(self, input_shape: tuple[int, ...], latent: int = 16, hidden: int = 128):
        super().__init__()
        size = math.prod(input_shape)
        self.input_shape = tuple(input_shape)
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, latent)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, size), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(-1, *self.input_shape)


def train_autoencoder(
    x: torch.Tensor, latent: int, epochs: int, lr: float, batch_size: int, gen: torch.Generator
) -> AutoEncoder:
    """Fit the auto-encoder to x (n, *input_shape) with Adam on the L2 reconstruction loss."""
    with torch.device("meta"):  # no default init (it would draw from the global RNG)
        ae = AutoEncoder(tuple(x.shape[1:]), latent)
    ae = ae.to_empty(device="cpu")
    # PyTorch's default scheme, drawn from `gen` (parameters are in module order, as init_params lays them out)
    torch.nn.utils.vector_to_parameters(init_params(ae, gen), ae.parameters())
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = (ae(x[idx]) - x[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ae.eval()


@torch.no_grad()
def encode(ae: AutoEncoder, x: torch.Tensor) -> torch.Tensor:
    """Latents (n, latent) of samples x (n, *input_shape)."""
    return ae.encoder(x)


def class_mean_latents(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Algorithm 1, lines 17-18: the mean latent per class, concatenated: (num_classes * latent,).
    A class the individual has no sample of takes the individual's overall mean latent, so it
    neither attracts nor repels others on that class."""
    overall = z.mean(0)  # (latent,)
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, y, z)  # (classes, latent)
    counts = torch.bincount(y, minlength=num_classes).unsqueeze(1)  # (classes, 1)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), overall)
    return means.flatten()


def single_sample_group(z_individual: torch.Tensor, z_global: torch.Tensor, n: int) -> np.ndarray:
    """Algorithm 1, lines 12-15: for each sample of D_I in turn, its ceil(n / |D_I|) nearest samples
    of D_G not chosen yet; the first n chosen (indices into D_G)."""
    if not 1 <= n <= len(z_global):
        raise ValueError(f"n: SG needs 1 <= n <= |D_G| = {len(z_global)}, got {n}")
    per_sample = math.ceil(n / len(z_individual))
    dist = torch.cdist(z_individual, z_global)  # (n_I, n_G)
    taken = torch.zeros(len(z_global), dtype=torch.bool)
    chosen: list[int] = []
    for row in dist:
        row = row.masked_fill(taken, math.inf)
        k = min(per_sample, int((~taken).sum()))
        picks = torch.topk(row, k, largest=False).indices
        taken[picks] = True
        chosen += picks.tolist()
        if len(chosen) >= n:
            break
    return np.asarray(chosen[:n], dtype=np.int64)


def individual_group(
    target: torch.Tensor, candidates: Mapping[int, torch.Tensor], n: int, exclude: int | None = None
) -> list[int]:
    """Algorithm 1, line 19: the n candidates (id -> class-mean latents) nearest to `target` in L2,
    nearest first; `exclude` (the individual itself) is never chosen."""
    ids = [i for i in candidates if i != exclude]
    if not 1 <= n <= len(ids):
        raise ValueError(f"n: IG needs 1 <= n <= {len(ids)} candidate individuals, got {n}")
    dist = torch.stack([torch.linalg.vector_norm(candidates[i] - target) for i in ids])
    order = torch.argsort(dist, stable=True)[:n]
    return [ids[i] for i in order.tolist()]
