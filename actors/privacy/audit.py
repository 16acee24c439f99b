"""The empirical privacy audit: membership-inference AUC.

The loss-threshold membership-inference attack of Yeom, Giacomelli, Fredrikson & Jha 2018
("Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting"), pooled over a
population (``mia_auc``) and per individual against its own model (``individual_mia_auc``);
scikit-learn is imported on first use. The privacy term of the local objective that this audit
motivates lives with the algorithms (``sim/algorithms/penalty.py``), and the canary audit that
bounds epsilon from below is ``fedmeta.actors.audit``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the loss-threshold membership-inference attack (Yeom et al. 2018).

    The attacker scores each example by -loss (members are fit better, so lower loss means "member");
    the AUC over all thresholds is 0.5 with no leakage and 1.0 when losses separate members perfectly.
    """
    from sklearn.metrics import roc_auc_score  # sklearn is only needed by the audit

    members = np.asarray(member_losses, dtype=np.float64).ravel()
    others = np.asarray(nonmember_losses, dtype=np.float64).ravel()
    if len(members) == 0 or len(others) == 0:
        raise ValueError("mia_auc: needs at least one member and one non-member loss")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    return float(roc_auc_score(labels, -np.concatenate([members, others])))


def individual_mia_auc(member_losses: Sequence, nonmember_losses: Sequence) -> np.ndarray:
    """Each individual's own loss-threshold AUC: its train examples (members) against its test
    examples (non-members), both under its own model; nan where either set is empty. Unlike the
    pooled audit, an individual's easy or hard data does not blur it."""
    return np.array(
        [mia_auc(m, o) if len(m) and len(o) else np.nan for m, o in zip(member_losses, nonmember_losses)],
        dtype=np.float64,
    )
