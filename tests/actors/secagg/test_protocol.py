"""The secure-aggregation round protocol: exactness under dropouts, aborts, what the server holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.protocol import (
    PHASES,
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    ProtocolViolation,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    ShareDecryptionError,
    UnmaskRequest,
    UnmaskShares,
    run_round,
)
from fedmeta.actors.secagg.quantize import dequantize, quantize, sub_mod, sum_mod


def _vectors(num_clients: int, n: int, bits: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**bits, size=n, dtype=np.uint64) for i in range(num_clients)}


def _plain_sum(vectors, ids, bits):
    return sum_mod([vectors[i] for i in sorted(ids)], bits)


def _drive(vectors, k, t, bits, seed, drop=None, *, allow_low_threshold=False):
    """Run a round step by step with the public API; returns (result or the SecAggAbort, server,
    clients, masked inputs). Mirrors `run_round` but keeps the server when the round aborts."""
    drop = {p: set((drop or {}).get(p, ())) for p in PHASES}
    ids = sorted(vectors)
    n = len(vectors[ids[0]])
    child = np.random.default_rng(seed).spawn(len(ids) + 1)
    server = SecAggServer(0, ids, k, t, bits, n, child[0], allow_low_threshold=allow_low_threshold)
    clients = {c: SecAggClient(c, 0, bits, t, g) for c, g in zip(ids, child[1:])}
    masked: dict[int, np.ndarray] = {}
    try:
        keys = server.receive_keys([clients[c].advertise() for c in ids if c not in drop["advertise"]])
        inbox = server.route_shares([clients[c].share_keys(keys[c]) for c in keys if c not in drop["share"]])
        msgs = [clients[c].masked_input(vectors[c], inbox[c]) for c in inbox if c not in drop["masked"]]
        masked = {m.client: m.y for m in msgs}
        request = server.collect_masked(msgs)
        result = server.unmask(
            [clients[c].unmask(request) for c in request.survivors if c not in drop["unmask"]]
        )
    except SecAggAbort as exc:
        return exc, server, clients, masked
    return result, server, clients, masked


def _feasible(graph, t, drop) -> bool:
    """Oracle: does every phase keep >= t clients and every needed secret >= t share holders?"""
    u1 = set(graph)
    if len(u1) < t or any(len(graph[i]) < t for i in u1):
        return False
    u2 = u1 - set(drop.get("share", ()))
    if len(u2) < t or any(len(graph[i] & u2) < t for i in u2):
        return False
    u3 = u2 - set(drop.get("masked", ()))
    if len(u3) < t:
        return False
    u5 = u3 - set(drop.get("unmask", ()))
    if any(len(graph[i] & u2 & u5) < t for i in u3):
        return False
    return all(len(graph[d] & u5) >= t for d in u2 - u3 if graph[d] & u3)


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_clients,k,t,bits",
    [(5, None, 3, 24), (12, None, 7, 62), (20, 6, 4, 24), (30, 10, 6, 33), (15, 4, 3, 1), (8, 20, 5, 24)],
)
def test_no_dropouts_sum_is_exact(num_clients, k, t, bits):
    vectors = _vectors(num_clients, 120, bits, seed=num_clients)
    total, server = run_round(vectors, k, t, bits, np.random.default_rng(7))
    assert total.dtype == np.uint64 and total.shape == (120,)
    np.testing.assert_array_equal(total, _plain_sum(vectors, vectors, bits))
    assert server.survivors == frozenset(vectors) and not server.dropped
    expected_degree = num_clients - 1 if k is None or k >= num_clients - 1 else k
    assert all(len(nb) == expected_degree for nb in server.graph.values())


def test_non_contiguous_client_ids():
    bits = 20
    rng = np.random.default_rng(3)
    vectors = {
        cid: rng.integers(0, 2**bits, size=64, dtype=np.uint64) for cid in (3, 17, 40, 41, 99, 1000, 7, 12)
    }
    total, server = run_round(vectors, 6, 4, bits, np.random.default_rng(1), {"masked": {17}, "unmask": {99}})
    assert server.dropped == {17}
    np.testing.assert_array_equal(total, _plain_sum(vectors, set(vectors) - {17}, bits))


def test_dropouts_in_every_phase_exact():
    bits = 24
    vectors = _vectors(30, 100, bits, seed=11)
    # k=10, t=6: at most 4 absent per neighbourhood (1 shared nothing, 2 dropped, 1 silent).
    drop = {"advertise": {0}, "share": {1}, "masked": {3, 4}, "unmask": {6}}
    result, server, _, _ = _drive(vectors, 10, 6, bits, seed=5, drop=drop)
    assert _feasible(server.graph, 6, drop)
    assert not isinstance(result, SecAggAbort), result
    survivors = set(range(30)) - {0, 1, 3, 4}
    assert server.survivors == survivors and server.dropped == {3, 4}
    assert 0 not in server.graph and 1 not in server.shared
    np.testing.assert_array_equal(result, _plain_sum(vectors, survivors, bits))
    # A client silent at unmasking is a survivor: its b_i was reconstructed from neighbours' shares.
    assert 6 in server.survivors and 6 not in server.responders


_ROUND_CONFIGS = st.sampled_from([(8, None, 5), (10, 4, 3), (12, 6, 4), (16, 8, 5), (14, 6, 5), (9, None, 6)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=_ROUND_CONFIGS,
    seed=st.integers(0, 2**32 - 1),
    drops=st.lists(st.tuples(st.sampled_from(PHASES), st.integers(0, 15)), max_size=8),
)
def test_dropouts_any_phase_exact_or_abort(config, seed, drops):
    """For any dropout pattern: if every needed secret keeps >= t holders the sum of the
    survivors is exact, otherwise the round aborts with SecAggAbort (never a wrong sum)."""
    num_clients, k, t = config
    bits = 24
    drop: dict[str, set[int]] = {p: set() for p in PHASES}
    gone: set[int] = set()
    for phase, c in drops:  # a client drops at most once (its first listed phase)
        if c < num_clients and c not in gone:
            drop[phase].add(c)
            gone.add(c)
    vectors = _vectors(num_clients, 50, bits, seed % 1000)
    result, server, _, _ = _drive(vectors, k, t, bits, seed, drop)
    if not server.graph:  # too few advertised for receive_keys to build a graph
        event("infeasible: abort before the graph")
        assert isinstance(result, SecAggAbort) and num_clients - len(drop["advertise"]) < t
        assert "advertised keys" in str(result)
    elif _feasible(server.graph, t, drop):
        event("feasible: exact sum")
        assert not isinstance(result, SecAggAbort), result
        survivors = set(vectors) - drop["advertise"] - drop["share"] - drop["masked"]
        assert server.survivors == survivors
        np.testing.assert_array_equal(result, _plain_sum(vectors, survivors, bits))
    else:
        event("infeasible: abort")
        assert isinstance(result, SecAggAbort)
        assert "threshold t=" in str(result)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    masked=st.sets(st.integers(0, 19), max_size=2),
    unmask=st.sets(st.integers(0, 19), max_size=1),
)
def test_feasible_dropouts_exact(seed, masked, unmask):
    """Few enough dropouts (k=8, t=5: at most 3 absent per neighbourhood) always succeed."""
    bits = 30
    unmask -= masked
    vectors = _vectors(20, 60, bits, seed % 97)
    total, server = run_round(
        vectors, 8, 5, bits, np.random.default_rng(seed), {"masked": masked, "unmask": unmask}
    )
    np.testing.assert_array_equal(total, _plain_sum(vectors, set(range(20)) - masked, bits))
    assert server.dropped == masked


def test_quantized_floats_roundtrip():
    rng = np.random.default_rng(0)
    clip, step, bits = 1.0, 1e-4, 24
    floats = {i: rng.uniform(-1, 1, size=80) for i in range(10)}
    vectors = {i: quantize(x, clip, step, bits, rng) for i, x in floats.items()}
    total, _ = run_round(vectors, 4, 3, bits, rng, {"masked": {9}})
    approx = dequantize(total, step, bits)
    np.testing.assert_allclose(approx, sum(floats[i] for i in range(9)), atol=9 * step)


# ---------------------------------------------------------------------------------------------
# Aborts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drop,pattern",
    [
        ({"advertise": set(range(7))}, "advertised"),  # 3 left < t=5
        ({"share": set(range(7))}, "shared"),
        ({"masked": set(range(7))}, "masked inputs"),
        ({"unmask": set(range(7))}, "unmasking shares"),
    ],
)
def test_too_many_dropouts_abort_complete_graph(drop, pattern):
    vectors = _vectors(10, 50, 24, seed=1)
    with pytest.raises(SecAggAbort, match=pattern):
        run_round(vectors, None, 5, 24, np.random.default_rng(0), drop)


def test_abort_names_client_and_share_count():
    bits = 24
    vectors = _vectors(12, 50, bits, seed=2)
    # Find a client's neighbourhood, then make too many of its neighbours skip unmasking.
    _, server = run_round(vectors, 4, 3, bits, np.random.default_rng(9))
    victim = 5
    silent = set(sorted(server.graph[victim])[:2])  # 2 of 4 answer: 2 < t=3
    with pytest.raises(SecAggAbort) as info:
        run_round(vectors, 4, 3, bits, np.random.default_rng(9), {"unmask": silent})
    msg = str(info.value)
    assert "threshold t=3" in msg and "shares arrived" in msg and "client" in msg


def test_abort_when_dropped_clients_key_cannot_be_reconstructed():
    bits = 24
    vectors = _vectors(12, 50, bits, seed=3)
    _, server = run_round(vectors, 4, 3, bits, np.random.default_rng(4))
    d = 0
    nb = sorted(server.graph[d])
    # d drops after sharing; two of its four neighbours send no shares -> 2 < t=3 key shares.
    with pytest.raises(
        SecAggAbort, match=rf"mask private key .* client {d}: 2 shares arrived, threshold t=3"
    ):
        run_round(vectors, 4, 3, bits, np.random.default_rng(4), {"masked": {d}, "unmask": set(nb[:2])})


def test_abort_when_neighbourhood_too_small_after_share_phase():
    vectors = _vectors(12, 50, 24, seed=4)
    _, server = run_round(vectors, 4, 3, 24, np.random.default_rng(6))
    nb = sorted(server.graph[1])
    with pytest.raises(SecAggAbort, match="neighbours of client 1 shared keys"):
        run_round(vectors, 4, 3, 24, np.random.default_rng(6), {"share": set(nb[:2])})


def test_construction_refuses_bad_thresholds():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(0, 10, 4, 5, 24, 10, rng)  # t > k
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(0, 10, 4, 0, 24, 10, rng)  # t < 1
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(0, 10, None, 10, 24, 10, rng)  # t > n - 1 on the complete graph
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(0, 10, 6, 3, 24, 10, rng)  # t <= k/2
    SecAggServer(0, 10, 6, 3, 24, 10, rng, allow_low_threshold=True)
    with pytest.raises(ValueError, match="even k"):
        SecAggServer(0, 10, 5, 3, 24, 10, rng)
    with pytest.raises(ValueError, match="bits"):
        SecAggServer(0, 10, 4, 3, 63, 10, rng)


def test_low_threshold_opt_in_runs():
    vectors = _vectors(10, 40, 16, seed=5)
    total, _ = run_round(
        vectors, 6, 2, 16, np.random.default_rng(0), {"masked": {1, 2, 3}}, allow_low_threshold=True
    )
    np.testing.assert_array_equal(total, _plain_sum(vectors, set(range(10)) - {1, 2, 3}, 16))


# ---------------------------------------------------------------------------------------------
# What the server holds
# ---------------------------------------------------------------------------------------------


def _arrays_in(obj, seen=None):
    """Every numpy array reachable from obj's attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for k, v in obj.items() for x in (k, v) for a in _arrays_in(x, seen)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [a for v in obj for a in _arrays_in(v, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, np.random.Generator)):
        return _arrays_in(vars(obj), seen)
    return []


def test_server_never_holds_an_individual_vector(chi2_pvalue):
    bits = 16
    vectors = _vectors(20, 200, bits, seed=8)
    drop = {"share": {0}, "masked": {1, 2}, "unmask": {3}}
    d = {p: set(drop.get(p, ())) for p in PHASES}
    ids = sorted(vectors)
    child = np.random.default_rng(12).spawn(len(ids) + 1)
    server = SecAggServer(0, ids, 6, 4, bits, 200, child[0])
    clients = {c: SecAggClient(c, 0, bits, 4, g) for c, g in zip(ids, child[1:])}
    keys = server.receive_keys([clients[c].advertise() for c in ids])
    inbox = server.route_shares([clients[c].share_keys(keys[c]) for c in keys if c not in d["share"]])
    masked = {}
    for c in inbox:
        if c in d["masked"]:
            continue
        msg = clients[c].masked_input(vectors[c], inbox[c])
        masked[c] = msg.y
        server.receive_masked(msg)
        held = server.held_vectors()
        assert len(held) == 1  # only the running sum
        for h in held:
            for i in vectors:
                assert not np.array_equal(h, vectors[i])
            assert not any(np.array_equal(h, y) for j, y in masked.items() if len(masked) > 1)
    request = server.close_masked()
    survivors = request.survivors
    plain = _plain_sum(vectors, survivors, bits)
    (masked_sum,) = server.held_vectors()
    assert not np.array_equal(masked_sum, plain)
    np.testing.assert_array_equal(masked_sum, sum_mod([masked[c] for c in survivors], bits))
    # The masked sum is not q_i plus a partial mask: removing any one q_i leaves a uniform-looking vector.
    for i in survivors:
        assert not np.array_equal(sub_mod(masked_sum, vectors[i], bits), sub_mod(plain, vectors[i], bits))
    assert chi2_pvalue(masked_sum >> np.uint64(bits - 4), 16) > 1e-4
    # Every array reachable from the server is one of the held vectors, none a client's q_i or y_i.
    reachable = _arrays_in(server)
    assert len(reachable) == 1 and np.array_equal(reachable[0], masked_sum)
    total = server.unmask([clients[c].unmask(request) for c in survivors if c not in d["unmask"]])
    np.testing.assert_array_equal(total, plain)
    held = server.held_vectors()
    assert len(held) == 2 and np.array_equal(held[1], plain)
    for h in held + _arrays_in(server):
        for i in vectors:
            assert not np.array_equal(h, vectors[i])
        for y in masked.values():
            assert not np.array_equal(h, y)
    # It never learned both secrets of any client.
    assert not set(server.revealed_self) & set(server.revealed_key)
    assert set(server.revealed_key) <= server.dropped and set(server.revealed_self) <= server.survivors


def test_messages_are_immutable():
    msg = AdvertiseKeys(1, b"\x00" * 32, b"\x01" * 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.client = 2  # type: ignore[misc]
    vectors = _vectors(4, 10, 8, seed=0)
    rng = np.random.default_rng(0).spawn(5)
    server = SecAggServer(0, 4, None, 2, 8, 10, rng[0], allow_low_threshold=True)
    clients = [SecAggClient(i, 0, 8, 2, rng[i + 1]) for i in range(4)]
    keys = server.receive_keys([c.advertise() for c in clients])
    inbox = server.route_shares([c.share_keys(keys[c.client_id]) for c in clients])
    y = clients[0].masked_input(vectors[0], inbox[0]).y
    assert y.dtype == np.uint64 and not y.flags.writeable


# ---------------------------------------------------------------------------------------------
# Enforcement: never both shares, tampering, protocol order
# ---------------------------------------------------------------------------------------------


def _to_unmask_phase(num_clients=10, k=4, t=3, bits=16, seed=0, drop_masked=frozenset({0})):
    vectors = _vectors(num_clients, 30, bits, seed)
    child = np.random.default_rng(seed).spawn(num_clients + 1)
    server = SecAggServer(0, num_clients, k, t, bits, 30, child[0])
    clients = {c: SecAggClient(c, 0, bits, t, child[c + 1]) for c in range(num_clients)}
    keys = server.receive_keys([clients[c].advertise() for c in clients])
    inbox = server.route_shares([clients[c].share_keys(keys[c]) for c in keys])
    request = server.collect_masked(
        [clients[c].masked_input(vectors[c], inbox[c]) for c in inbox if c not in drop_masked]
    )
    return vectors, server, clients, inbox, request


def test_server_rejects_both_shares_for_one_client():
    _, server, clients, _, request = _to_unmask_phase()
    holder = next(iter(sorted(server.graph[0])))  # a neighbour of the dropped client 0
    honest = clients[holder].unmask(request)
    assert 0 in honest.key_shares and 0 not in honest.self_shares
    assert set(honest.self_shares).isdisjoint(honest.key_shares)
    survivor = next(iter(honest.self_shares))
    forged = UnmaskShares(
        holder, dict(honest.self_shares), {**honest.key_shares, survivor: honest.self_shares[survivor]}
    )
    with pytest.raises(ProtocolViolation, match="both"):
        server.unmask([forged])
    assert not server.revealed_self and not server.revealed_key  # nothing of it was stored
    # Key shares for a survivor (dressed as a dropped client's) are rejected too.
    wrong_kind = UnmaskShares(holder, {}, {survivor: honest.self_shares[survivor]})
    with pytest.raises(ProtocolViolation, match="not its dropped neighbours"):
        server.unmask([wrong_kind])


def test_client_refuses_to_reveal_both_kinds():
    _, server, clients, _, request = _to_unmask_phase()
    holder = min(server.graph[0])
    clients[holder].unmask(request)
    # A (lying) second request that declares a surviving neighbour dropped and 0 surviving.
    survivor = min(server.graph[holder] - {0})
    lie = UnmaskRequest(survivors=(request.survivors - {survivor}) | {0}, dropped=frozenset({survivor}))
    with pytest.raises(ProtocolViolation, match="already revealed"):
        clients[holder].unmask(lie)
    with pytest.raises(ProtocolViolation, match="surviving and dropped"):
        clients[holder].unmask(UnmaskRequest(request.survivors | {0}, request.dropped))


def test_tampered_ciphertext_raises_at_receiving_client():
    bits, t = 16, 3
    vectors = _vectors(8, 20, bits, seed=1)
    child = np.random.default_rng(1).spawn(9)
    server = SecAggServer(0, 8, 4, t, bits, 20, child[0])
    clients = {c: SecAggClient(c, 0, bits, t, child[c + 1]) for c in range(8)}
    keys = server.receive_keys([clients[c].advertise() for c in clients])
    inbox = server.route_shares([clients[c].share_keys(keys[c]) for c in keys])
    a, _b = sorted(inbox[2])[:2]
    flipped = bytearray(inbox[2][a])
    flipped[5] ^= 1
    tampered = {**inbox[2], a: bytes(flipped)}
    swapped = {**inbox[3]}
    x, y = sorted(swapped)[:2]
    swapped[x], swapped[y] = swapped[y], swapped[x]  # right bytes, wrong sender
    request = server.collect_masked(
        [clients[c].masked_input(vectors[c], {2: tampered, 3: swapped}.get(c, inbox[c])) for c in clients]
    )
    with pytest.raises(ShareDecryptionError):
        clients[2].unmask(request)
    with pytest.raises(ShareDecryptionError):
        clients[3].unmask(request)
    clients[4].unmask(request)  # untouched inbox decrypts fine


def test_ciphertexts_bound_to_round():
    """A ciphertext from another round (same keys replayed) fails authentication."""
    bits, t = 16, 3
    a = SecAggClient(0, 1, bits, t, np.random.default_rng(1))
    b = SecAggClient(1, 2, bits, t, np.random.default_rng(2))
    others = [SecAggClient(c, 1, bits, t, np.random.default_rng(c + 10)) for c in (2, 3)]
    ka, kb = a.advertise(), b.advertise()
    ko = [o.advertise() for o in others]
    nk = {m.client: (m.c_pk, m.s_pk) for m in [kb, *ko]}
    sa = a.share_keys(nk)
    sb = b.share_keys({0: (ka.c_pk, ka.s_pk), **{m.client: (m.c_pk, m.s_pk) for m in ko}})
    b.masked_input(np.zeros(4, np.uint64), {0: sa.shares[1], 2: sb.shares[2], 3: sb.shares[3]})
    with pytest.raises(ShareDecryptionError):
        b.unmask(UnmaskRequest(frozenset({0, 1, 2, 3}), frozenset()))


def test_protocol_order_and_unknown_senders():
    bits, t = 16, 3
    child = np.random.default_rng(0).spawn(7)
    server = SecAggServer(0, 6, 4, t, bits, 10, child[0])
    with pytest.raises(ProtocolViolation):
        server.route_shares([])
    clients = {c: SecAggClient(c, 0, bits, t, child[c + 1]) for c in range(6)}
    with pytest.raises(ProtocolViolation, match="unknown client"):
        server.receive_keys([AdvertiseKeys(9, b"\x01" * 32, b"\x02" * 32)])
    keys = server.receive_keys([clients[c].advertise() for c in range(5)])  # client 5 absent
    with pytest.raises(ProtocolViolation):
        clients[5].share_keys({})  # never advertised
    msgs = [clients[c].share_keys(keys[c]) for c in keys]
    with pytest.raises(ProtocolViolation, match="did not advertise"):
        server.route_shares(msgs + [EncryptedShares(5, {})])
    inbox = server.route_shares(msgs[:4])  # client 4 shared nothing
    assert 4 not in inbox and all(4 not in box for box in inbox.values())
    with pytest.raises(ProtocolViolation, match="did not share"):
        server.receive_masked(MaskedInput(4, np.zeros(10, np.uint64)))
    with pytest.raises(ProtocolViolation, match="shape"):
        server.receive_masked(MaskedInput(0, np.zeros(11, np.uint64)))
    server.receive_masked(clients[0].masked_input(np.ones(10, np.uint64), inbox[0]))
    with pytest.raises(ProtocolViolation, match="twice"):
        server.receive_masked(MaskedInput(0, np.zeros(10, np.uint64)))
    with pytest.raises(ValueError, match="2\\^16"):
        clients[1].masked_input(np.full(10, 2**16, np.uint64), inbox[1])


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_deterministic_from_rng():
    bits = 24
    vectors = _vectors(16, 80, bits, seed=21)
    drop = {"masked": {2}, "unmask": {4}}
    r1, s1, _, m1 = _drive(vectors, 6, 4, bits, seed=33, drop=drop)
    r2, s2, _, m2 = _drive(vectors, 6, 4, bits, seed=33, drop=drop)
    np.testing.assert_array_equal(r1, r2)
    assert s1.graph == s2.graph and s1.public_keys == s2.public_keys
    np.testing.assert_array_equal(s1.held_vectors()[0], s2.held_vectors()[0])
    assert all(np.array_equal(m1[c], m2[c]) for c in m1)
    assert s1.revealed_self == s2.revealed_self and s1.revealed_key == s2.revealed_key
    r3, s3, _, _m3 = _drive(vectors, 6, 4, bits, seed=34, drop=drop)
    np.testing.assert_array_equal(r1, r3)  # same sum ...
    assert s1.public_keys != s3.public_keys  # ... from different keys and masks
    assert not np.array_equal(s1.held_vectors()[0], s3.held_vectors()[0])
    t1, _ = run_round(vectors, 6, 4, bits, np.random.default_rng(5), drop)
    t2, _ = run_round(vectors, 6, 4, bits, np.random.default_rng(5), drop)
    np.testing.assert_array_equal(t1, t2)


@pytest.mark.parametrize("advertised", [40, 31])
def test_placement_is_the_ring_the_graph_is_built_on(advertised):
    """The early placement fixes the Harary ring when everyone planned advertises (each client
    linked to its k/2 ring neighbours either side); with fewer, a fresh k-regular ring is drawn
    over those who did, and the round stays exact."""
    ids = list(range(100, 140))
    child = np.random.default_rng(5).spawn(len(ids) + 1)
    server = SecAggServer(0, ids, 6, 4, 20, 8, child[0])
    ring = server.placement()
    assert sorted(ring) == ids and ring == server.placement()
    clients = {c: SecAggClient(c, 0, 20, 4, g) for c, g in zip(ids, child[1:])}
    here = sorted(ids)[:advertised]
    keys = server.receive_keys([clients[c].advertise() for c in here])
    assert all(len(server.graph[c]) == 6 for c in here)
    if advertised == len(ids):
        for p, c in enumerate(ring):
            assert server.graph[c] == {ring[(p + d) % 40] for d in (-3, -2, -1, 1, 2, 3)}
    vectors = {c: np.full(8, c, dtype=np.uint64) for c in here}
    inbox = server.route_shares([clients[c].share_keys(keys[c]) for c in here])
    request = server.collect_masked([clients[c].masked_input(vectors[c], inbox[c]) for c in here])
    result = server.unmask([clients[c].unmask(request) for c in request.survivors])
    np.testing.assert_array_equal(result, _plain_sum(vectors, here, 20))


def test_co_hosted_clients_sharing_pair_keys_send_the_same_bytes():
    """A simulation process hosting several clients derives each pair's share key once
    (`pair_keys`); every ciphertext must be byte-identical to fully separate clients'."""
    ids, bits, t = list(range(8)), 16, 3

    def shares(pair_keys):
        child = np.random.default_rng(5).spawn(len(ids) + 1)
        server = SecAggServer(0, ids, 4, t, bits, 3, child[0])
        clients = {c: SecAggClient(c, 0, bits, t, g) for c, g in zip(ids, child[1:])}
        keys = server.receive_keys([clients[c].advertise() for c in ids])
        return [clients[c].share_keys(keys[c], pair_keys).shares for c in keys]

    cache: dict = {}
    assert shares(cache) == shares(None) and not cache  # every co-hosted pair used its key once
