"""What happens around each round of an experiment, one hook per job.

The experiment's loop (sim/run/experiment.py) trains a round, then calls every hook's `after_round`
in order; a hook's `before_round` or `after_round` may return a reason to stop the run. The order
is the order of the list `experiment.hooks` builds: accounting, the round's log line, the learned
privacy weight (sim/run/leakage.py, when on), evaluation and export, the model card's released
statistics (under DP), checkpointing, auto-tuning, progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.artifacts.rundir import PERSONALIZED
from fedmeta.sim.data.canaries import canary_direction
from fedmeta.sim.engine.federation import Federation, RoundResult
from fedmeta.sim.metrics import describe
from fedmeta.sim.run.card_stats import release_card_statistics
from fedmeta.sim.run.report import model_card
from fedmeta.sim.run.run_state import RunState

ProgressFn = Callable[[int, int, dict], None]


class Hook:
    """Base: does nothing. Subclasses override what they need."""

    def before_round(self, state: RunState) -> str | None:
        return None

    def after_round(self, state: RunState, res: RoundResult) -> str | None:
        return None


class Accounting(Hook):
    """The privacy the round released: stop before a round that would overshoot the budget."""

    def before_round(self, state: RunState) -> str | None:
        return state.accounting.budget_stop()

    def after_round(self, state: RunState, res: RoundResult) -> None:
        state.accounting.record_round(res.metrics, res.trained)


BYTES_KEYS = ("bytes_up", "bytes_down", "bytes_up_per_client", "bytes_down_per_client")
# a secure round's survivor floor and the bits its k and t reach for the round's cohort size
SECAGG_KEYS = ("secagg_survivor_floor", "secagg_security_bits", "secagg_correctness_bits")


class RoundLog(Hook):
    """One row per round metric: aborts, loss, update norm, counts, time, epsilon so far."""

    def after_round(self, state: RunState, res: RoundResult) -> None:
        cps = res.clients / res.seconds if res.seconds > 0 else float("nan")
        eps, local_eps = state.accounting.epsilon(), state.accounting.local_epsilon()
        state.log.add_many(
            state.rounds_done,
            {
                "aborted": 1.0 if "aborted" in res.metrics else 0.0,
                "train_loss": res.metrics.get("train_loss", float("nan")),
                "update_norm": res.metrics.get("update_norm", 0.0),
                "clients": res.clients,
                "dropped": res.dropped,
                "round_s": res.seconds,
                "clients_per_s": cps,
                **{
                    k: res.metrics[k]
                    for k in ("lost_clients", "late_clients", "offline", "rejected_updates")
                    if res.metrics.get(k)
                },
                **{
                    k: res.metrics[k]
                    for k in (*BYTES_KEYS, *SECAGG_KEYS, "sim_round_s", "staleness_mean", "staleness_max")
                    if k in res.metrics
                },
                **({"epsilon": eps} if eps is not None else {}),
                **({"local_epsilon": local_eps} if local_eps is not None else {}),
            },
        )
        failures = state.faults.get("worker_failures", 0) + state.faults.get("aggregator_failures", 0)
        state.shown = {"clients_per_s": cps, **({"actor_failures": failures} if failures else {})}


class Evaluation(Hook):
    """Every `eval.every` rounds and after the last: acc(D_G), acc(D_I) before and after
    personalization, the MIA audit; the last one also exports the personalized models."""

    def __init__(self, fed: Federation, run_dir: Path):
        self.fed, self.run_dir = fed, run_dir

    def after_round(self, state: RunState, res: RoundResult) -> None:
        done, rounds = state.rounds_done, self.fed.cfg.federation.rounds
        if done % self.fed.cfg.eval.every and done != rounds:
            return
        ev = self.fed.evaluate(done, state.global_params, export=done == rounds, weight=state.privacy_weight)
        if "personalized" in ev:
            export_personalized(self.run_dir, ev["client_ids"], ev["personalized"])
        stats = state.log.add_eval(
            done, describe(ev["acc_DG"]), ev["client_ids"], ev["acc_global_DI"], ev["acc_personalized_DI"]
        )
        state.log.add_many(done, {k: ev[k] for k in ("mia_auc_global", "mia_auc_personalized") if k in ev})
        if "mia_auc_DI" in ev and np.isfinite(ev["mia_auc_DI"]).any():  # each individual's own AUC, averaged
            state.log.add(done, "mia_auc_individual", float(np.nanmean(ev["mia_auc_DI"])))
        state.shown.update({k: v["mean"] for k, v in stats.items()})


class CardStatistics(Hook):
    """Under DP, after the last round: release the model card's input profile and panel quality
    once (sim/run/card_stats.py), each only if the budget has room, and account them, so the final
    checkpoint's card ships them and the run's epsilon includes them. Without DP the card ships
    the exact ones, marked not private."""

    def __init__(self, fed: Federation):
        self.fed = fed

    def after_round(self, state: RunState, res: RoundResult) -> None:
        fed, done = self.fed, state.rounds_done
        if not fed.plan.dp.enabled or done != fed.cfg.federation.rounds or state.card_stats is not None:
            return
        panel = lambda: fed.private_metric(done, state.global_params, "accuracy", state.privacy_weight)  # noqa: E731
        state.card_stats = release_card_statistics(
            fed.plan, state.accounting, fed.secrets.noise("card-input-profile"), panel, done
        )


class Checkpointing(Hook):
    """Every `run.checkpoint_every` rounds and after the last: checkpoint.pt (atomic) and the metric
    tables. `save` is also what the experiment calls when the run stops or fails."""

    def __init__(self, fed: Federation, run_dir: Path):
        self.fed, self.run_dir = fed, run_dir

    def after_round(self, state: RunState, res: RoundResult) -> None:
        done = state.rounds_done
        if done % self.fed.cfg.run.checkpoint_every == 0 or done == self.fed.cfg.federation.rounds:
            self.save(state)

    def save(self, state: RunState) -> None:
        try:
            state.server_state = self.fed.server_state()
        except Exception:  # saving after a failure: the aggregator may be gone; keep its last known state
            pass
        card = model_card(self.fed.plan, state.rounds_done, state.accounting, state.log, state.card_stats)
        ckpt.save(self.run_dir, state.to_checkpoint(card))
        state.log.save(self.run_dir)


class Progress(Hook):
    def __init__(self, progress: ProgressFn, rounds: int):
        self.progress, self.rounds = progress, rounds

    def after_round(self, state: RunState, res: RoundResult) -> None:
        self.progress(state.rounds_done, self.rounds, state.shown)


class CanaryAudit(Hook):
    """The one-run privacy audit of the released model (Steinke, Nasr & Jagielski 2023; actors/audit.py):
    score every canary (sim/data/canaries.py) by what the model's total change holds of its
    direction, guess 'in' for the highest and 'out' for the lowest, and turn the correct guesses into
    an epsilon that holds as a lower bound with probability `privacy.audit_confidence`; with the
    attack's TPR at 1% FPR."""

    def __init__(self, fed: Federation, state: RunState):
        self.fed, self.state = fed, state

    def summary(self) -> dict:
        plan = self.fed.plan
        out = {
            "audit_canaries": len(plan.canary_ids),
            "audit_epsilon_lower": None,
            "audit_tpr_at_1pct_fpr": None,
        }
        if len(plan.canary_ids) < 2:
            return out
        from fedmeta.actors.audit import best_audit, tpr_at_fpr

        scores, inside = canary_scores(plan, self.state.global_params), plan.canary_included
        res = best_audit(
            scores,
            inside,
            delta=plan.dp.delta if plan.dp.enabled else 0.0,
            confidence=plan.cfg.privacy.audit_confidence,
        )
        tpr = tpr_at_fpr(scores[inside], scores[~inside], 0.01) if inside.any() and (~inside).any() else None
        return {
            **out,
            "audit_epsilon_lower": res["epsilon_lower"],
            "audit_tpr_at_1pct_fpr": tpr,
            "audit_confidence": plan.cfg.privacy.audit_confidence,
        }


def canary_scores(plan, global_params) -> np.ndarray:
    """Each canary's direction projected on the model's total change: what it added, plus noise."""
    change = np.asarray(global_params, dtype=np.float64) - plan.init_params
    return np.array(
        [float(change @ canary_direction(plan.cfg.seed, int(c), plan.n_params)) for c in plan.canary_ids]
    )


def export_personalized(run_dir: Path, ids: list[int], flats) -> Path:
    """personalized/<client id>.npy: each evaluated individual's fine-tuned parameters, for serving."""
    out = run_dir / PERSONALIZED
    out.mkdir(exist_ok=True)
    for cid, flat in zip(ids, flats):
        tmp = out / f".{cid}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(flat, dtype=np.float32))
        tmp.replace(out / f"{cid}.npy")
    return out
