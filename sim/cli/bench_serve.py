"""`fedmeta bench --serve`: requests per second and latency of the Serve application on loopback,
against a no-op app and a single member at the same concurrency (numbers, not timed tests)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray

from fedmeta.sim.engine.cluster import init_ray


# ---------------------------------------------------------------- serving
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, body: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients on loopback, each sending the next request when its last one returns."""
    import asyncio

    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(session) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
        "requests": len(latencies),
    }


def _noop_app():
    """Serve's own ceiling: an ingress that reads the request body and answers a constant JSON object,
    without parsing, models or handles (the proxy and one replica: what every request pays)."""
    from ray import serve

    @serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class Noop:
        async def __call__(self, request) -> dict:
            await request.body()
            return {"predictions": [0], "answered_by": "noop"}

    return Noop.bind()


def _serve_members(tmp: Path, members: int) -> dict[str, str]:
    """`members` checkpoints of the quickstart's MLP (64-128-30) with seeded weights: serving cost
    does not depend on what the weights learned."""
    import torch

    from fedmeta.sim.checkpoint import save_member
    from fedmeta.sim.config import ModelConfig
    from fedmeta.sim.models import build_model, init_params

    cfg = ModelConfig(kind="mlp", hidden=[128])
    paths = {}
    for i in range(members):
        flat = init_params(build_model(cfg, (1, 8, 8), 30), torch.Generator().manual_seed(i)).numpy()
        paths[f"m{i}"] = str(
            save_member(
                tmp / f"m{i}",
                cfg.model_dump(),
                flat,
                [1, 8, 8],
                30,
                {"mean": [0.3] * 64, "var": [0.05] * 64, "n": 1000},
            ).parent
        )
    return paths


# no per-request access log, in the proxy and every replica: under load writing it and shipping it to
# the driver costs as much as a model's forward pass
QUIET_SERVE = {"enable_access_log": False, "log_level": "WARNING"}


def _deploy_serve_target(label: str, paths: dict[str, str]) -> None:
    """Replace whatever runs with the target: the no-op app, one member, or the routed ensemble."""
    from ray import serve

    from fedmeta.serve.app import Deployment

    for app in list(serve.status().applications):
        serve.delete(app)
    if label == "noop":
        serve.run(_noop_app(), name="noop", route_prefix="/", logging_config=QUIET_SERVE)
    else:
        chosen = {"m0": paths["m0"]} if label == "single" else paths
        Deployment(dict(chosen), reweight_s=2.0, logging_config=QUIET_SERVE).deploy()


SERVE_TARGETS = ("noop", "single", "ensemble")


def _fan_outs(base_url: str) -> tuple[float, float]:
    """(requests answered, member fan-outs) so far, from the ingress's /metrics."""
    from urllib.request import urlopen

    with urlopen(f"{base_url}/metrics", timeout=30) as r:
        counts = dict(
            line.split()[:2] for line in r.read().decode().splitlines() if line.startswith("fedmeta_")
        )
    return float(counts["fedmeta_requests_total"]), float(counts["fedmeta_ensemble_batches_total"])


def run_serve_bench(
    concurrency: tuple[int, ...] = (1, 8, 32), seconds: float = 5.0, members: int = 3, warmup_s: float = 1.0
) -> dict:
    """Throughput and latency of the routed ensemble (`members` members, default top-k) against a
    single-model deployment of the same model and a no-op Serve app (Serve's ceiling on this
    machine), on loopback, with the same request body, load generator and concurrency levels."""
    import asyncio
    import tempfile

    from ray import serve

    paths = _serve_members(Path(tempfile.mkdtemp(prefix="fedmeta-bench-serve-")), members)
    started = init_ray(None)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET_SERVE)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/predict"
    body = {"inputs": np.random.default_rng(0).random((1, 64)).round(4).tolist()}
    out: dict = {"members": members, "seconds": seconds, **{label: {} for label in SERVE_TARGETS}}
    try:
        for label in SERVE_TARGETS:
            _deploy_serve_target(label, paths)
            asyncio.run(_load(url, body, 4, warmup_s))
            for c in concurrency:
                before = None if label == "noop" else _fan_outs(base)
                out[label][c] = asyncio.run(_load(url, body, c, seconds))
                if before is not None:  # how many requests shared a member call (ingress batching)
                    (r0, f0), (r1, f1) = before, _fan_outs(base)
                    out[label][c]["requests_per_fan_out"] = (r1 - r0) / max(f1 - f0, 1)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    c8 = 8 if 8 in concurrency else concurrency[len(concurrency) // 2]
    at = {label: out[label][c8] for label in SERVE_TARGETS}
    out.update({f"{label}_rps": at[label]["rps"] for label in SERVE_TARGETS})
    out.update({f"{label}_p99_ms": at[label]["p99_ms"] for label in SERVE_TARGETS})
    out.update(
        errors=sum(r["errors"] for label in SERVE_TARGETS for r in out[label].values()),
        throughput_ratio=_ratio(at["ensemble"]["rps"], at["single"]["rps"]),
        single_to_noop=_ratio(at["single"]["rps"], at["noop"]["rps"]),
        at_concurrency=c8,
    )
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # None, not a ZeroDivisionError, when nothing was answered
