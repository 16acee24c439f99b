"""Evaluation on the panel every `eval.every` rounds, and the export of personalized models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fedmeta.sim.artifacts.durable import write_atomic
from fedmeta.sim.artifacts.rundir import PERSONALIZED
from fedmeta.sim.engine.federation import Federation, RoundResult
from fedmeta.sim.metrics import describe
from fedmeta.sim.run.hooks.base import Hook
from fedmeta.sim.run.run_state import RunState


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


def export_personalized(run_dir: Path, ids: list[int], flats) -> Path:
    """personalized/<client id>.npy: each evaluated individual's fine-tuned parameters, for serving."""
    out = run_dir / PERSONALIZED
    out.mkdir(exist_ok=True, mode=0o700)
    for cid, flat in zip(ids, flats):
        buf = io.BytesIO()
        np.save(buf, np.asarray(flat, dtype=np.float32))
        write_atomic(out / f"{cid}.npy", buf.getvalue(), mode=0o600)  # durable: old or new, never torn
    return out
