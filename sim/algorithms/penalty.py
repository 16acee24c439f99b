"""The privacy term of the privacy-regularized ("meta-reinforced privacy") local objective.

An output-confidence penalty: overconfident outputs on training data are exactly what the
loss-threshold membership-inference attack (Yeom, Giacomelli, Fredrikson & Jha 2018, the audit in
actors/privacy/) exploits, so penalizing the negative entropy of the predictions (Pereyra et al.
2017, "Regularizing Neural Networks by Penalizing Confident Output Distributions") shrinks the
member/non-member loss gap. `algorithm.privacy_lambda` weighs it in both cohort paths.
"""

from __future__ import annotations

import torch


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-example sum_c p_c log p_c of softmax(logits): (..., classes) -> (...). 0 for a one-hot
    (fully confident) prediction, -log(classes) for a uniform one."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * log_p).sum(dim=-1)


def privacy_penalty(logits: torch.Tensor) -> torch.Tensor:
    """Output-confidence penalty: negative entropy of softmax(logits), averaged over examples.

    Pure tensor ops (no in-place, no .item()) so it works under ``torch.func.vmap`` and ``grad``;
    ``logits`` is (..., classes).
    """
    return negative_entropy(logits).mean()
