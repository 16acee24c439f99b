"""What happens around each round of an experiment, one hook per job.

The experiment's loop (sim/run/experiment.py) trains a round, then calls every hook's `after_round`
in order; a hook's `before_round` or `after_round` may return a reason to stop the run. The order
is the order of the list `experiment.hooks` builds: accounting, the round's log line, the learned
privacy weight (sim/run/leakage.py, when on), evaluation and export, the model card's released
statistics (under DP), checkpointing, auto-tuning, progress.

One file a hook; `base.Hook` is the interface (`before_round`, `after_round`, `summary`).
"""

from fedmeta.sim.run.hooks.accounting import Accounting
from fedmeta.sim.run.hooks.base import Hook, ProgressFn
from fedmeta.sim.run.hooks.canary_audit import CanaryAudit, canary_scores
from fedmeta.sim.run.hooks.card_statistics import CardStatistics
from fedmeta.sim.run.hooks.checkpointing import Checkpointing
from fedmeta.sim.run.hooks.evaluation import Evaluation, export_personalized
from fedmeta.sim.run.hooks.progress import Progress
from fedmeta.sim.run.hooks.round_log import RoundLog

__all__ = [
    "Accounting",
    "CanaryAudit",
    "CardStatistics",
    "Checkpointing",
    "Evaluation",
    "Hook",
    "Progress",
    "ProgressFn",
    "RoundLog",
    "canary_scores",
    "export_personalized",
]
