"""The noise mechanisms of user-level DP-FedAvg and the clipping that bounds their sensitivity.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models"): ``clip_update`` / ``clip_updates`` bound each user's contribution to L2 norm C,
so the sum of updates has sensitivity C to adding or removing one user, and ``central_noise`` adds
N(0, (z C)^2) per coordinate to that sum (central mode). The distributed mode's noise is Skellam
(Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning"): each client adds an integer share (``distributed_noise_share``) to its quantized update
before secure aggregation masks it, and ``effective_noise_multiplier`` is the z reached when only
the survivors' shares arrive. Pure functions returning ``(result, metrics)``; randomness comes only
from the generator passed in (see ``fedmeta.sim.seeding``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmeta.actors.privacy.checks import _positive
from fedmeta.sim.seeding import gaussian_noise


# ---------------------------------------------------------------- client half: clipping
def _clip_scale(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    # Scale only vectors that are outside the ball: those inside stay bit-for-bit unchanged
    # (Opacus' C / (norm + 1e-6) would shrink every vector slightly).
    safe = torch.where(norms > clip_norm, norms, torch.ones_like(norms))
    return torch.where(norms > clip_norm, clip_norm / safe, torch.ones_like(norms))


def clip_update(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict]:
    """One client's update scaled onto the L2 ball of radius ``clip_norm`` (direction kept).

    ``||result|| <= clip_norm`` up to floating-point rounding of the scaling.
    """
    _positive("clip_norm", clip_norm)
    norm = torch.linalg.vector_norm(update)
    clipped = update * _clip_scale(norm, clip_norm).to(update.dtype)
    return clipped, {"norm": float(norm), "clipped": bool(norm > clip_norm)}


def clip_updates(updates: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict]:
    """Row-wise ``clip_update`` of a (clients, n) batch in one pass.

    Metrics: ``norms`` (each client's norm before clipping, a list of floats) and
    ``clipped_fraction`` (share of clients that were scaled down), which is what one tunes C by.
    """
    _positive("clip_norm", clip_norm)
    if updates.dim() != 2:
        raise ValueError(f"updates: expected shape (clients, n), got {tuple(updates.shape)}")
    norms = torch.linalg.vector_norm(updates, dim=1)
    clipped = updates * _clip_scale(norms, clip_norm).to(updates.dtype).unsqueeze(1)
    fraction = float((norms > clip_norm).float().mean()) if len(norms) else 0.0
    return clipped, {"norms": norms.tolist(), "clipped_fraction": fraction}


# ---------------------------------------------------------------- server half: central noise
def central_noise(
    sum_vec: torch.Tensor, clip_norm: float, noise_multiplier: float, gen
) -> tuple[torch.Tensor, dict]:
    """``sum_vec`` plus i.i.d. N(0, (z C)^2) per coordinate, drawn from ``gen`` (a
    `fedmeta.sim.seeding.Secrets.noise` source: the attack-safe `SecureGaussian` unless secrets are seeded).

    The sum of C-clipped updates has L2 sensitivity C to one user, so std z*C makes this the
    Gaussian mechanism with noise multiplier z (the quantity the accountant is stepped with).
    """
    _positive("clip_norm", clip_norm)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier: must be a finite number >= 0, got {noise_multiplier}")
    std = noise_multiplier * clip_norm
    noise = gaussian_noise(sum_vec.shape, gen, dtype=sum_vec.dtype, device=sum_vec.device) * std
    return sum_vec + noise, {"noise_std": std, "noise_norm": float(torch.linalg.vector_norm(noise))}


# ---------------------------------------------------------------- client half: distributed noise
def skellam_mu(clip_norm: float, noise_multiplier: float, expected_clients: int, step: float) -> float:
    """Per-client Poisson rate mu: each share is Poisson(mu) - Poisson(mu), variance 2 mu.

    Chosen so the shares of ``expected_clients`` clients sum to variance (z C / step)^2, i.e. the
    central noise z C expressed in quantization steps.
    """
    _positive("clip_norm", clip_norm)
    _positive("noise_multiplier", noise_multiplier)
    _positive("step", step)
    if expected_clients < 1:
        raise ValueError(f"expected_clients: must be >= 1, got {expected_clients}")
    return (noise_multiplier * clip_norm / step) ** 2 / (2 * expected_clients)


def distributed_noise_share(
    n: int,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: int,
    step: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One client's integer noise share (int64, in units of the quantization ``step``), length n.

    Each client adds Skellam(mu, mu) noise to its quantized update before masking, so the
    aggregator only ever unmasks an already-noised sum (Agarwal, Kairouz & Liu 2021). Sums of
    independent Skellams are Skellam, so with all ``expected_clients`` clients surviving the sum
    carries Skellam noise of variance exactly (z C / step)^2.

    Accounting: only survivors' shares reach the sum, so a round with dropouts adds less noise than
    planned; step the accountant with ``effective_noise_multiplier(z, expected_clients, survivors)``,
    never with the nominal z. The accountant treats the Skellam noise as the Gaussian of the same
    variance; Agarwal et al. show the Skellam RDP equals the Gaussian term plus a correction that
    vanishes as the variance in step units grows, so keep (z C / step)^2 large (fine quantization).
    """
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    mu = skellam_mu(clip_norm, noise_multiplier, expected_clients, step)
    return (rng.poisson(mu, n) - rng.poisson(mu, n)).astype(np.int64)


def effective_noise_multiplier(noise_multiplier: float, expected_clients: int, survivors: int) -> float:
    """The z actually achieved when only ``survivors`` of ``expected_clients`` shares were added.

    Noise variance scales with the number of shares: survivors/expected of (z C)^2, hence
    z * sqrt(survivors / expected). A round with no survivors releases nothing and must be aborted
    rather than accounted.
    """
    _positive("noise_multiplier", noise_multiplier)
    if expected_clients < 1:
        raise ValueError(f"expected_clients: must be >= 1, got {expected_clients}")
    if survivors < 1:
        raise ValueError(f"survivors: must be >= 1 (abort the round instead), got {survivors}")
    return noise_multiplier * math.sqrt(survivors / expected_clients)
