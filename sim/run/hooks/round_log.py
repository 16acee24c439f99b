"""One row per round metric in the run's long-format log."""

from __future__ import annotations

from fedmeta.sim.engine.federation import RoundResult
from fedmeta.sim.run.hooks.base import Hook
from fedmeta.sim.run.run_state import RunState

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
