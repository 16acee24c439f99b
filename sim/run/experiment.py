"""An experiment: a federation run for `federation.rounds` rounds, with its run directory.

    plan = FederationPlan.from_config(cfg)        # pure: data, model, noise, secure aggregation
    fed = Federation(plan)                        # the actors
    while rounds remain and no hook says stop:    # `run_rounds`
        res = fed.train_round(...); state.advance(...); hook.after_round(state, res) for each hook
    summary.json, plots

Ctrl-C or a failing round saves a checkpoint of the last completed round and re-raises, so
`--resume` continues from there.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import ray

from fedmeta.actors.privacy import RunAccounting
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.artifacts.durable import write_atomic
from fedmeta.sim.artifacts.rundir import new_run_dir, run_secrets
from fedmeta.sim.config import ExperimentConfig, to_yaml
from fedmeta.sim.engine.cluster import init_ray
from fedmeta.sim.engine.federation import Federation
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.run.hooks import (
    Accounting,
    CanaryAudit,
    CardStatistics,
    Checkpointing,
    Evaluation,
    Hook,
    Progress,
    ProgressFn,
    RoundLog,
)
from fedmeta.sim.run.report import run_summary
from fedmeta.sim.run.run_state import RunState

# A hook a layer above the run adds (the auto-tuning hook of sim/tuning/autotune.py): built from the
# federation, the run directory and the function that checkpoints a state.
HookFactory = Callable[[Federation, Path, Callable[[RunState], None]], Hook]


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    extra_hooks: Sequence[HookFactory] = (),
) -> tuple[Path, dict]:
    """Run (or resume) an experiment; returns (run_dir, summary). `extra_hooks` run after the
    built-in ones; `tune.auto` needs the auto-tuning one (fedmeta.sim.tuning.autotune.run_experiment
    adds it, as `fedmeta.run` and the CLI do)."""
    if resume and run_dir is None:
        raise ValueError("resume needs a run directory")
    if cfg.tune.auto and not extra_hooks:
        raise ValueError(
            "tune.auto: the auto-tuning hook is missing; run it with "
            "fedmeta.sim.tuning.autotune.run_experiment (or fedmeta.run)"
        )
    # errors in the config or the data surface before any side effect
    plan = FederationPlan.from_config(cfg)
    saved = ckpt.load(run_dir) if resume else None
    if not resume:
        run_dir = run_dir or new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        run_dir.chmod(0o700)  # owner-only: the model, per-user exports and logs of real users
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    secrets = run_secrets(cfg, run_dir, resume)
    started = init_ray(cfg.ray.address, cfg.ray.connect_timeout_s)
    try:
        fed = Federation(plan, run_dir, secrets)
        try:
            return run_dir, _run(cfg, fed, run_dir, saved, progress, extra_hooks)
        finally:
            fed.shutdown()
    finally:
        if started:
            ray.shutdown()


def _run(
    cfg: ExperimentConfig,
    fed: Federation,
    run_dir: Path,
    saved: ckpt.Checkpoint | None,
    progress: ProgressFn | None,
    extra_hooks: Sequence[HookFactory],
) -> dict:
    state = initial_state(fed.plan, saved)
    fed.load_server_state(state.server_state)  # a resumed adaptive server continues its moments
    fed.faults.counts.update(state.faults)  # and the tally of lost actors continues
    saver = Checkpointing(fed, run_dir)
    hooks: list[Hook] = [Accounting(), RoundLog()]
    if cfg.privacy.leakage_control.target_auc is not None:
        from fedmeta.sim.run.leakage import LeakageControl

        hooks.append(LeakageControl(fed, state))  # before evaluation: it personalizes with the new lambda
    hooks += [Evaluation(fed, run_dir), CardStatistics(fed), saver, CanaryAudit(fed, state)]
    hooks += [make(fed, run_dir, saver.save) for make in extra_hooks]
    if progress:
        hooks.append(Progress(progress, cfg.federation.rounds))
    try:
        run_rounds(fed, state, hooks, cfg.federation.rounds)
    except BaseException:
        # Ctrl-C or a failed round (e.g. the aggregator refused non-finite updates): keep what is good
        saver.save(state)
        raise
    if state.stopped:
        saver.save(state)
    return finish(fed, state, hooks, run_dir)


def run_rounds(fed: Federation, state: RunState, hooks: list[Hook], rounds: int) -> None:
    """Train rounds until `rounds` are done or a hook gives a reason to stop (kept in the state)."""
    while state.rounds_done < rounds:
        state.stopped = next((r for r in (h.before_round(state) for h in hooks) if r), None)
        if state.stopped:
            return
        res = fed.train_round(state.rounds_done, state.global_params)
        with _interrupt_after():  # the round and its bookkeeping (accounting, log) land together
            state.advance(res.global_params, res.clients, res.seconds, res.dropped)
            state.faults = res.faults or state.faults
            for h in hooks:
                state.stopped = h.after_round(state, res) or state.stopped
        if state.stopped:
            return


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _interrupt_after():
    """Ctrl-C or SIGTERM inside the block takes effect when it ends (a second one at once), so a
    checkpoint never holds a round whose privacy spend or log row is missing. Only the main
    thread can take signals; elsewhere (a Tune trial) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def defer(signum, frame):
        pending.append(signum)
        if len(pending) > 1:  # asked twice: stop now, as the signal would have
            restore()
            signal.raise_signal(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, defer)
    try:
        yield
    finally:
        restore()
    if pending:  # delivered late, to the handlers that were there before
        signal.raise_signal(pending[0])


def initial_state(plan: FederationPlan, saved: ckpt.Checkpoint | None) -> RunState:
    """A fresh run at the plan's initial model, or the state of a checkpoint."""
    accounting = RunAccounting(plan.dp, plan.local_dp, seeded=plan.cfg.run.seeded_secrets)
    if saved is None:
        return RunState(0, plan.init_params, accounting)
    return RunState.resume(saved, accounting)


def finish(fed: Federation, state: RunState, hooks: list[Hook], run_dir: Path) -> dict:
    """summary.json (with what hooks add, e.g. the auto-tuner's result) and the plots."""
    summary = run_summary(fed.plan, state, run_dir, fed.peak_rss_mib())
    for h in hooks:
        summary.update(h.summary())
    write_atomic(
        run_dir / "summary.json", json.dumps(summary, indent=2)
    )  # a crash never leaves half a summary
    from fedmeta.sim.run.plots import plot_run  # matplotlib only when a run finishes

    plot_run(state.log, run_dir)
    return summary
