"""`fedmeta bench --serve`: the no-op app, one model and the routed ensemble answer the same load, and
the report holds each one's throughput and latency (p99 included)."""

import json

import pytest
from typer.testing import CliRunner


@pytest.mark.slow
def test_serve_bench_reports_noop_single_and_ensemble(ray_session):
    from fedmeta.sim.cli.bench_serve import SERVE_TARGETS, run_serve_bench

    res = run_serve_bench(concurrency=(2,), seconds=0.5, warmup_s=0.2)
    for label in SERVE_TARGETS:
        r = res[label][2]
        assert r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0, (label, r)
        assert res[f"{label}_rps"] == r["rps"] and res[f"{label}_p99_ms"] == r["p99_ms"]
    assert res["ensemble"][2]["requests_per_fan_out"] >= 1 and "requests_per_fan_out" not in res["noop"][2]
    assert res["errors"] == 0 and res["at_concurrency"] == 2
    assert res["throughput_ratio"] == pytest.approx(res["ensemble_rps"] / res["single_rps"])
    assert res["single_to_noop"] == pytest.approx(res["single_rps"] / res["noop_rps"])


def test_serve_bench_prints_p99_of_all_three_and_json(monkeypatch):
    """The report's lines from a canned result (no Ray): p99 of each target, the ratios, the JSON."""
    import fedmeta.sim.cli.bench_serve as bench
    from fedmeta.sim.cli.main import app

    def level(rps):
        return {"rps": rps, "p50_ms": 10.0, "p99_ms": 1000 / rps, "errors": 0, "requests": int(rps)}

    res = {
        "members": 3,
        "seconds": 1.0,
        "at_concurrency": 8,
        "errors": 0,
        "throughput_ratio": 0.8,
        "single_to_noop": 0.5,
    }
    for label, rps in (("noop", 200.0), ("single", 100.0), ("ensemble", 80.0)):
        res[label] = {8: level(rps) | ({} if label == "noop" else {"requests_per_fan_out": 2.5})}
        res[f"{label}_rps"], res[f"{label}_p99_ms"] = rps, 1000 / rps
    monkeypatch.setattr(bench, "run_serve_bench", lambda seconds: res)
    out = CliRunner().invoke(app, ["bench", "--serve", "--json", "--seconds", "1"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert (
        "noop 200.0 req/s (p99 5.0 ms), single 100.0 req/s (p99 10.0 ms), ensemble 80.0 req/s (p99 12.5 ms)"
        in out.output
    )
    assert (
        "ensemble / single throughput: 0.80; single / no-op (Serve's ceiling): 0.50; errors 0" in out.output
    )
    assert sum(line.startswith(("noop ", "single ", "ensemble ")) and "p99" in line for line in lines) == 3
    assert "errors 0  2.5 requests a member call" in out.output
    assert json.loads(lines[-1])["noop"]["8"]["p99_ms"] == 5.0
