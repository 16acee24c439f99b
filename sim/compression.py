"""Update compression (pure): what a client does to its update before the upload, and what the
server reads back. The simulator applies both ends at the client (the server's sum then holds
exactly what it would decode) and measures the encoded message for the byte count.

int8: stochastic rounding to 8 bits with one float32 scale per client (QSGD's unbiased rounding,
    Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization"): about
    a quarter of a float32 update.
topk: only the `fraction` largest-magnitude coordinates, as (index, value) pairs, with error
    feedback (Stich et al. 2018, "Sparsified SGD with Memory"): what a client leaves out is kept
    and added to its next update, so nothing is lost, only delayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Int8Update:
    """What one client uploads under int8 compression."""

    client: int
    q: np.ndarray  # (n,) int8
    scale: float


@dataclass(frozen=True, eq=False)
class SparseUpdate:
    """What one client uploads under top-k compression."""

    client: int
    index: np.ndarray  # (k,) int32
    value: np.ndarray  # (k,) float32


def int8_roundtrip(u: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded (clients, n), int8 codes): each row scaled by its max |u| / 127 and rounded up
    with probability equal to the remainder, so the decoded row is unbiased."""
    scale = (u.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(u.dtype).tiny)
    x = u / scale
    low = torch.floor(x)
    draws = torch.stack([torch.rand(u.shape[1], generator=g, device=u.device) for g in gens])
    q = (low + (draws < x - low)).clamp(-127, 127)
    return q * scale, q.to(torch.int8)


def topk_roundtrip(u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded (clients, n), kept indices (clients, k)): the k largest |u| of each row."""
    idx = u.abs().topk(k, dim=1).indices
    return torch.zeros_like(u).scatter_(1, idx, u.gather(1, idx)), idx


def topk_size(n: int, fraction: float) -> int:
    return max(1, min(n, int(round(fraction * n))))


def compress(
    kind: str, u: torch.Tensor, residual: torch.Tensor | None, fraction: float, gens: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """What the server decodes from each client's update, the residual each client keeps (error
    feedback; None without), and one client's encoded message (its size is every client's)."""
    if residual is not None:
        u = u + residual
    if kind == "int8":
        decoded, q = int8_roundtrip(u, gens)
        sample = Int8Update(0, q[0].cpu().numpy(), float(u[0].abs().max() / 127))
    else:
        decoded, idx = topk_roundtrip(u, topk_size(u.shape[1], fraction))
        sample = SparseUpdate(0, idx[0].cpu().numpy().astype(np.int32), decoded[0, idx[0]].cpu().numpy())
    return decoded, (u - decoded) if residual is not None else None, sample
