"""User-level differential privacy for federated rounds: clip, noise, account, audit.

The stage has a client half and a server half, each a pure function returning ``(result, metrics)``:

* client: ``clip_update`` / ``clip_updates`` bound each user's contribution to L2 norm C, and in the
  distributed mode ``distributed_noise_share`` adds the client's share of integer noise before its
  quantized update is masked;
* server: ``central_noise`` adds N(0, (z C)^2) per coordinate to the unmasked sum (central mode).

This is DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models"): with per-user clipping to C the sum of updates has sensitivity C to adding or
removing one user, so Gaussian noise of std z*C on the sum, with users Poisson-sampled at rate q,
is the subsampled Gaussian mechanism that the accountants compose over rounds.

The distributed noise is Skellam (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning"): integer noise fits the integer vectors secure
aggregation sums modulo 2^b, and a sum of independent Skellams is again Skellam, so the noise in the
unmasked sum has an exactly known distribution whatever the number of contributors.

Accounting never re-implements RDP or PRV math: it wraps Opacus' accountants (RDP: Mironov 2017,
Mironov, Talwar & Zhang 2019; PRV: Gopi, Lee & Wutschitz 2021) and Opacus' noise search.

The empirical audit is the loss-threshold membership-inference attack of Yeom, Giacomelli,
Fredrikson & Jha 2018 ("Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting"). The privacy term of the local objective that this audit motivates lives with the
algorithms (``sim/algorithms/penalty.py``).

No global RNG is used: randomness comes only from the generator passed in (see ``fedmeta.sim.seeding``).

The modules, each importing only those above it:

* ``checks``: argument checks, and the accountant names (``AccountantName``, ``ACCOUNTANTS``);
* ``mechanisms``: clipping, central Gaussian noise, distributed Skellam noise shares;
* ``accountants``: ``Sampling``, the Opacus and dp-accounting accountants, ``epsilon_for``, the
  local DP-SGD ledger and the per-user exposure to an aggregator that knows the cohorts;
* ``calibration``: ``noise_for`` a target epsilon, and the run's z from its privacy config;
* ``audit``: membership-inference AUC;
* ``policy``: ``UserLevelDP`` and ``SampleLevelDP``, the run's DP as one object;
* ``budget``: ``budget_spent`` and the ``PrivacyBudget`` of a hyperparameter search (its ledger file);
* ``run_accounting``: ``RunAccounting``, the privacy a run has spent.

Everything is re-exported here: import from ``fedmeta.actors.privacy``.
"""

from __future__ import annotations

from fedmeta.actors.privacy.accountants import (
    FixedCohortAccountant,
    KnownParticipation,
    LocalDPLedger,
    PrivacyAccountant,
    Sampling,
    epsilon_for,
    make_accountant,
)
from fedmeta.actors.privacy.audit import individual_mia_auc, mia_auc
from fedmeta.actors.privacy.budget import PrivacyBudget, budget_spent
from fedmeta.actors.privacy.calibration import noise_for
from fedmeta.actors.privacy.checks import ACCOUNTANTS, AccountantName
from fedmeta.actors.privacy.mechanisms import (
    central_noise,
    clip_update,
    clip_updates,
    distributed_noise_share,
    effective_noise_multiplier,
    skellam_mu,
)
from fedmeta.actors.privacy.policy import SampleLevelDP, UserLevelDP
from fedmeta.actors.privacy.run_accounting import CENTRAL_TRUST, RunAccounting

__all__ = [
    "ACCOUNTANTS",
    "CENTRAL_TRUST",
    "AccountantName",
    "FixedCohortAccountant",
    "KnownParticipation",
    "LocalDPLedger",
    "PrivacyAccountant",
    "PrivacyBudget",
    "RunAccounting",
    "SampleLevelDP",
    "Sampling",
    "UserLevelDP",
    "budget_spent",
    "central_noise",
    "clip_update",
    "clip_updates",
    "distributed_noise_share",
    "effective_noise_multiplier",
    "epsilon_for",
    "individual_mia_auc",
    "make_accountant",
    "mia_auc",
    "noise_for",
    "skellam_mu",
]
