"""Update compression: int8 stochastic quantization and top-k with error feedback (properties),
the worker's messages and their byte counts, and a run."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.compression import compress, int8_roundtrip, topk_roundtrip, topk_size
from fedmeta.sim.seeding import torch_gen

rows = st.integers(1, 4).flatmap(
    lambda c: st.integers(2, 40).flatmap(
        lambda n: st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=c * n, max_size=c * n).map(
            lambda v: torch.tensor(v, dtype=torch.float32).reshape(c, n)
        )
    )
)


@settings(max_examples=100, deadline=None)
@given(rows, st.integers(0, 1000))
def test_int8_codes_stay_within_one_step_of_the_update(u, seed):
    decoded, q = int8_roundtrip(u, [torch_gen(seed, "t", i) for i in range(len(u))])
    step = u.abs().amax(dim=1, keepdim=True) / 127
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert bool(((decoded - u).abs() <= step * (1 + 1e-5) + 1e-12).all())


def test_int8_rounding_is_unbiased():
    u = torch.tensor([[0.3, -1.7, 2.0, 0.001, -0.5]])
    mean = torch.stack([int8_roundtrip(u, [torch_gen(s, "t")])[0] for s in range(4000)]).mean(0)
    step = float(u.abs().max() / 127)
    assert torch.allclose(mean, u, atol=0.05 * step)


@settings(max_examples=100, deadline=None)
@given(rows, st.floats(0.05, 1.0))
def test_topk_keeps_the_largest_coordinates(u, fraction):
    k = topk_size(u.shape[1], fraction)
    decoded, idx = topk_roundtrip(u, k)
    assert int((decoded != 0).sum(dim=1).max()) <= k
    for r in range(len(u)):
        kept = set(idx[r].tolist())
        left = [u[r, j].abs() for j in range(u.shape[1]) if j not in kept]
        assert not left or min(u[r, list(kept)].abs()) >= max(left)


@settings(max_examples=50, deadline=None)
@given(st.lists(rows, min_size=1, max_size=5).filter(lambda us: len({u.shape for u in us}) == 1))
def test_error_feedback_delays_but_never_loses(updates):
    """Telescoping: what the server decoded over the rounds plus the residual left equals the sum
    of the updates."""
    residual, sent = torch.zeros_like(updates[0]), torch.zeros_like(updates[0])
    for u in updates:
        decoded, residual, _ = compress("topk", u, residual, 0.2, [])
        sent += decoded
    assert torch.allclose(sent + residual, sum(updates), atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "topk"])
def test_the_worker_sends_what_the_server_decodes_and_counts_the_encoded_bytes(kind):
    from fedmeta.actors.client_worker import ClientWorker
    from fedmeta.sim.config import from_dict
    from tests.conftest import tiny_raw

    raw = tiny_raw(federation={"compression": {"kind": kind, "topk_fraction": 0.05}})
    w = ClientWorker(from_dict(raw))
    plain = ClientWorker(from_dict(tiny_raw()))
    g = np.zeros(w.n_params, np.float32) + 0.01
    m, _ = w.train(1, g, [3, 11, 25])
    full, _ = plain.train(1, g, [3, 11, 25])
    update_bytes = len(pickle.dumps(full.weighted_sum, protocol=5))
    if kind == "int8":  # one byte per coordinate and a scale, against four
        assert w.n_params < m.upload_bytes < w.n_params + 400 < update_bytes
        np.testing.assert_allclose(m.weighted_sum, full.weighted_sum, atol=3 * 0.05)
    else:  # 5% of the coordinates, 4 + 4 bytes each
        k = topk_size(w.n_params, 0.05)
        assert 8 * k < m.upload_bytes < 8 * k + 400
        assert len(w._residuals) == 3 and all(r.abs().sum() > 0 for r in w._residuals.values())


def test_compression_and_secure_aggregation_do_not_mix():
    from fedmeta.sim.config import ConfigError, from_dict
    from tests.conftest import tiny_raw

    with pytest.raises(ConfigError, match="federation.compression: secure aggregation sends masked vectors"):
        from_dict(tiny_raw(federation={"compression": {"kind": "int8"}}, secagg={"enabled": True}))


@pytest.mark.slow
def test_a_compressed_run_uploads_less(ray_session, tmp_path):
    import fedmeta
    from tests.conftest import tiny_raw

    sizes = {}
    for kind in ("none", "int8", "topk"):
        raw = tiny_raw(tmp_path / kind, federation={"compression": {"kind": kind, "topk_fraction": 0.05}})
        s = fedmeta.run(raw, overrides=["federation.rounds=3", "eval.every=3"]).summary
        sizes[kind] = s["bytes_up_per_client"]
        assert 0 <= s["acc_global_DI"]["mean"] <= 1
    assert sizes["topk"] < sizes["int8"] < sizes["none"] / 3
