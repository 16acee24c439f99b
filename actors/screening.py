"""The server's admission check on each client's update, before it can enter a sum: an update with
a NaN or an infinity, or (when a bound is set) an L2 norm above `max_norm`, is rejected and counted,
and never reaches the model.

Where it runs: a worker hosts many virtual clients and sends one summed message per round, so each
client's own update exists only there; the check is applied to every client's update as it arrives,
before summing, on behalf of the server. Under secure aggregation the server cannot see an update
by design, so the check is the client's own (its update is replaced by zeros: it still counts in
the secure sum, whose protocol must not lose a member) and a malicious client could skip it: a
limit of secure aggregation itself (see Bell et al. 2020 for robust variants). Central DP clips
every update to C, which bounds a finite update but not a NaN: clipping NaN gives NaN.
"""

from __future__ import annotations

import torch


def screen(updates: torch.Tensor, max_norm: float | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """(keep, counts) for a (clients, n_params) batch of updates: keep[i] is False for a rejected
    client; counts has `non_finite` and `oversized`. One pass over the batch (the row norms: NaN or
    inf exactly when a row holds one, or when a finite row's norm overflows float, which is then
    oversized whatever the bound); only such rare rows are looked at again."""
    norms = torch.linalg.vector_norm(updates, dim=1)
    keep = torch.isfinite(norms)
    if max_norm is not None:
        keep &= norms <= max_norm
    if bool(keep.all()):
        return keep, {"non_finite": 0, "oversized": 0}
    rejected = (~keep).nonzero().flatten()
    non_finite = int((~torch.isfinite(updates[rejected]).all(dim=1)).sum())
    return keep, {"non_finite": non_finite, "oversized": len(rejected) - non_finite}


def without_rejected(updates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The batch with rejected rows set to zero (not NaN-propagating: torch.where, not a product)."""
    return (
        updates
        if bool(keep.all())
        else torch.where(keep[:, None], updates, torch.zeros((), dtype=updates.dtype, device=updates.device))
    )
