"""sim/run/report.py's parts that stand alone."""

import numpy as np
import pytest

from fedmeta.sim.config import from_dict
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.metrics import MetricsLog
from fedmeta.sim.run.report import joiners_summary
from tests.conftest import tiny_raw


def test_joiners_summary_sets_the_newcomers_against_everyone_else_per_evaluation():
    plan = FederationPlan.from_config(
        from_dict(tiny_raw(data={"drift": {"at_round": 2, "style_strength": 3.0, "joiners": 10}}))
    )
    assert plan.joiner_ids.tolist() == list(range(30, 40))
    log = MetricsLog()
    for rnd, (joiner_acc, other_acc) in ((2, (0.1, 0.5)), (4, (0.4, 0.6))):
        ids = [3, 31, 7, 35]
        acc = np.array([other_acc, joiner_acc, other_acc + 0.1, joiner_acc + 0.1])
        log.add_eval(rnd, {"mean": 0.5}, ids, acc, acc + 0.2)
    j = joiners_summary(plan, log)["joiners"]
    assert j["at_round"] == 2 and j["in_panel"] == 2 and j["rounds"] == [2, 4]
    assert j["acc_global_DI_joiners"] == pytest.approx([0.15, 0.45])
    assert j["acc_global_DI_others"] == pytest.approx([0.55, 0.65])
    assert j["acc_personalized_DI_joiners"] == pytest.approx([0.35, 0.65])
    plain = FederationPlan.from_config(from_dict(tiny_raw()))
    assert joiners_summary(plain, log) == {}
