"""Seeded runs end at the final metrics pinned before the driver was split into plan, federation
and experiment (tests/sim/run/pin_metrics.py says how they were taken and how to renew them)."""

import json

import pytest

from tests.sim.run.pin_metrics import PINNED, fingerprint, private_metrics, run_scenario, scenarios

pytestmark = pytest.mark.slow
PIN = json.loads(PINNED.read_text())
SAME_KERNELS = PIN["fingerprint"] == fingerprint()
ACCURACIES = ("acc_global_DG", "acc_global_DI", "acc_personalized_DI")


@pytest.mark.parametrize("name", sorted(PIN["runs"]))
def test_a_seeded_run_ends_at_its_pinned_metrics(ray_session, tmp_path, name):
    got, want = run_scenario(scenarios(tmp_path)[name]), PIN["runs"][name]
    if SAME_KERNELS:  # bit for bit: the model, every logged metric, every exported model
        assert got == want
        return
    # another torch build or CPU: float sums round differently; the run must still land close
    for key in ACCURACIES:
        assert got["summary"][key]["mean"] == pytest.approx(want["summary"][key]["mean"], abs=0.05)
    for key in ("rounds", "dropouts", "stopped_early", "secagg_bits"):
        assert got["summary"][key] == want["summary"][key]


def test_the_private_tuning_metric_is_pinned(ray_session, tmp_path):
    got = private_metrics(tmp_path)
    for case, want in PIN["private_metric"].items():
        if SAME_KERNELS:
            assert got[case] == want
        else:
            assert got[case] == pytest.approx(want, abs=0.05)
