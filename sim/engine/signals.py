"""SIGTERM taken as Ctrl-C (pure; no ray): a scheduler's stop ends a command the way Ctrl-C does,
at the last complete round, with exit status 143 instead of 130.

`ray.init` installs its own SIGTERM handler in the driver (it exits at once with status 15), so
`fedmeta.sim.engine.cluster.init_ray` puts this one back afterwards when a command asked for it.
"""

from __future__ import annotations

import signal
import threading

TERMINATED: list[int] = []  # SIGTERMs received (a library such as Tune may swallow the exception)
_taken: list[bool] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: the run stops at its last complete round (exit 143)."""


def _terminated(signum, frame):
    TERMINATED.append(signum)
    raise Terminated


def take_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (as SIGINT raises KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
        _taken.append(True)


def retake_sigterm() -> None:
    """After a library replaced the handler (ray.init does): take SIGTERM again, if it was taken."""
    if _taken:
        take_sigterm()
