"""Communication accounting in a run: per round in the log, per client and in total in the summary."""

import pytest

import fedmeta
from tests.conftest import tiny_raw
from tests.sim.engine.test_faults import round_metrics


@pytest.mark.slow
def test_summary_reports_bytes_and_secure_aggregation_uploads_more(ray_session, tmp_path):
    runs = {}
    for secure in (False, True):
        raw = tiny_raw(tmp_path / str(secure), secagg={"enabled": secure})
        runs[secure] = fedmeta.run(raw, overrides=["federation.rounds=2", "eval.every=2"])
    plain, secure = runs[False].summary, runs[True].summary
    n_params = 8 * 8 * 32 + 32 + 32 * 10 + 10
    assert 4 * n_params < plain["bytes_up_per_client"] < 4 * n_params + 1024  # a float32 update
    assert plain["bytes_down_per_client"] == pytest.approx(plain["bytes_up_per_client"], abs=512)  # the model
    assert secure["bytes_up_per_client"] > 8 * n_params > plain["bytes_up_per_client"]  # uint64 masked + keys
    assert secure["bytes_down_per_client"] > plain["bytes_down_per_client"]  # + keys, shares, request
    rounds = round_metrics(runs[False].run_dir)
    assert plain["bytes_up_total"] == sum(r["bytes_up"] for r in rounds.values())
    assert all(r["bytes_up"] == r["clients"] * r["bytes_up_per_client"] for r in rounds.values())
