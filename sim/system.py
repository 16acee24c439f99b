"""Simulated device time (pure): a seeded system model gives every client a device, and a
client's round a duration, so a run can report how long it would take on real devices.

A device's compute speed and its two bandwidths are log-normal around their medians (the shape
FedScale measured on real devices), drawn from (seed, client id): the same device every round. A
client's round lasts its download, its local batches at its speed, then its upload:

    duration = bytes_down / down + batches * step_s / speed + bytes_up / up

A synchronous round lasts as long as its slowest reporting client; with a deadline, clients that
would finish after it drop out and the round lasts the deadline; with over-selection, the
fastest clients report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmeta.sim.seeding import np_rng


@dataclass(frozen=True)
class Device:
    speed: float  # local batches per second relative to a median device
    down_bps: float  # bytes per second
    up_bps: float


def device(seed: int, cid: int, system) -> Device:
    """Client `cid`'s device under `system` (a `fedmeta.sim.config.SystemConfig`)."""
    rng = np_rng(seed, "system", cid)
    speed, down, up = np.exp(
        rng.normal(0.0, [system.speed_sigma, system.bandwidth_sigma, system.bandwidth_sigma])
    )
    return Device(
        float(speed), system.down_mbps * 1e6 / 8 * float(down), system.up_mbps * 1e6 / 8 * float(up)
    )


def duration(dev: Device, batches: int, bytes_down: int, bytes_up: int, step_s: float) -> float:
    """Seconds one client's round takes on its device."""
    return bytes_down / dev.down_bps + batches * step_s / dev.speed + bytes_up / dev.up_bps


def choose(durations: np.ndarray, quota: int | None, deadline: float | None) -> tuple[np.ndarray, float]:
    """Which clients report (a boolean mask over `durations`, in their order) and how long the
    round lasts for them: none that would finish after the deadline, then the `quota` fastest."""
    keep = np.ones(len(durations), dtype=bool) if deadline is None else durations <= deadline
    if quota is not None and keep.sum() > quota:
        order = np.argsort(np.where(keep, durations, np.inf), kind="stable")
        keep = np.zeros(len(durations), dtype=bool)
        keep[order[:quota]] = True
    last = float(durations[keep].max()) if keep.any() else 0.0
    filled = quota is not None and int(keep.sum()) == quota  # the round closes at its quota-th report
    if deadline is not None and bool((durations > deadline).any()) and not filled:
        return keep, float(deadline)  # the server waited for the deadline
    return keep, last


def online(streams, round_index: int, cids: np.ndarray, availability: float) -> np.ndarray:
    """Which of the asked devices are online this round (a boolean mask), from the run's secret
    streams (`Secrets`): who was online says who took part."""
    if availability >= 1:
        return np.ones(len(cids), dtype=bool)
    return streams.np_rng("availability", round_index).random(len(cids)) < availability
