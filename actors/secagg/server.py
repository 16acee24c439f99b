"""The SecAgg+ server's side of one round (protocol.py describes the protocol): route keys and
encrypted shares, collect masked inputs, refuse to unmask below the survivor floor, and
reconstruct the masks of dropped clients from the survivors' shares. It sees only masked vectors."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmeta.actors.secagg import shamir
from fedmeta.actors.secagg.graph import complete_graph, harary_from_ring, harary_graph
from fedmeta.actors.secagg.keys import (
    KEY_BYTES,
    keypair_from_bytes,
    pair_info,
    shared_seed,
)
from fedmeta.actors.secagg.masking import unmask_sum
from fedmeta.actors.secagg.messages import (
    MASK_PURPOSE,
    AdvertiseKeys,
    BelowSurvivorFloor,
    EncryptedShares,
    MaskedInput,
    ProtocolViolation,
    SecAggAbort,
    UnmaskRequest,
    UnmaskShares,
    _check_bits_arg,
    _check_id,
    _check_threshold,
)
from fedmeta.actors.secagg.params import survivor_floor

# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def _client_ids(clients: int | Iterable[int]) -> list[int]:
    """The round's client ids: 0..n-1 for a count n, else the given ids (distinct, at least 2)."""
    if isinstance(clients, (int, np.integer)) and not isinstance(clients, bool):
        ids = list(range(int(clients)))
    else:
        ids = [_check_id(c, "client id") for c in clients]
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    if len(ids) < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {len(ids)}")
    return ids


def _mask_degree(neighbours: int | None, n: int) -> int:
    """How many neighbours each of the n clients masks with: k, at most n - 1 (None: all of them)."""
    if neighbours is None:
        degree = n - 1
    else:
        if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 1:
            raise ValueError(f"neighbours k must be a positive integer or None, got {neighbours!r}")
        degree = min(int(neighbours), n - 1)
        if degree < n - 1 and degree % 2 == 1:
            raise ValueError(
                f"neighbours k={neighbours} is odd: a k-regular Harary graph needs an even number "
                f"of clients for odd k, which dropouts before the graph is built can break; use an even k"
            )
    return degree


def _check_vector_length(vector_length: int) -> int:
    if (
        isinstance(vector_length, bool)
        or not isinstance(vector_length, (int, np.integer))
        or vector_length < 1
    ):
        raise ValueError(f"vector_length must be a positive integer, got {vector_length!r}")
    return int(vector_length)


class SecAggServer:
    """The aggregator's side: receive_keys -> route_shares -> collect_masked -> unmask.

    `clients` is the number of clients (ids 0..n-1) or an iterable of client ids; `neighbours`
    is k of the Harary graph (None: complete graph, the original SecAgg). `rng` draws the graph.
    `dropout`: the largest fraction of the clients that may drop before unmasking (the delta k and t
    were sized for); fewer survivors are refused (None: only the threshold t applies).
    """

    def __init__(
        self,
        round_id: int,
        clients: int | Iterable[int],
        neighbours: int | None,
        threshold: int,
        bits: int,
        vector_length: int,
        rng: np.random.Generator,
        *,
        allow_low_threshold: bool = False,
        dropout: float | None = None,
    ):
        self.round_id = _check_id(round_id, "round_id")
        ids = _client_ids(clients)
        self.clients = frozenset(ids)
        n = len(ids)
        self.dropout = dropout
        self.survivor_floor = 0 if dropout is None else survivor_floor(n, dropout)
        degree = _mask_degree(neighbours, n)
        self.neighbours = None if neighbours is None else int(neighbours)
        self.degree = degree
        self.threshold = _check_threshold(threshold, degree, allow_low_threshold)
        self.bits = _check_bits_arg(bits)
        self.vector_length = _check_vector_length(vector_length)
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator")
        self._rng = rng
        self._ring: list[int] | None = None  # ring placement drawn early by `placement`
        self._phase = "keys"
        # Everything the server holds (see the module docstring):
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}  # U1: (c_pk, s_pk)
        self.graph: dict[int, frozenset[int]] = {}  # neighbour sets over U1
        self.shared: frozenset[int] = frozenset()  # U2
        self.survivors: frozenset[int] = frozenset()  # U3
        self.dropped: frozenset[int] = frozenset()  # U2 - U3
        self._masked_sum = np.zeros(self.vector_length, dtype=np.uint64)
        self._received: set[int] = set()
        self.revealed_self: dict[int, dict[int, bytes]] = {}  # {owner i: {holder j: share of b_i}}
        self.revealed_key: dict[int, dict[int, bytes]] = {}  # {owner d: {holder j: share of s_d^SK}}
        self.responders: frozenset[int] = frozenset()  # U5
        self._result: np.ndarray | None = None

    # ---- helpers ---------------------------------------------------------------------------

    def _expect(self, phase: str, step: str) -> None:
        if self._phase != phase:
            raise ProtocolViolation(f"server: {step} called in phase {self._phase!r}, expected {phase!r}")

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecAggAbort(
                f"round {self.round_id} aborted: only {count} {what}, fewer than threshold t={self.threshold}"
            )

    def held_vectors(self) -> list[np.ndarray]:
        """Every numpy array the server stores (copies): the running masked sum and, after
        unmasking, the unmasked sum."""
        out = [self._masked_sum.copy()]
        if self._result is not None:
            out.append(self._result.copy())
        return out

    @property
    def masked_sum(self) -> np.ndarray:
        """Copy of the running sum of the masked inputs received so far (mod 2^bits)."""
        return self._masked_sum.copy()

    @property
    def mask_graph(self) -> dict[int, frozenset[int]]:
        """Neighbours each client in U2 masked with: the graph restricted to U2."""
        return {i: self.graph[i] & self.shared for i in self.shared}

    # ---- round 0 ---------------------------------------------------------------------------

    def placement(self) -> list[int]:
        """The client ids in the order of the Harary ring the graph will be built on.

        The graph depends only on who takes part and the server's coins, not on any key, so the
        server can publish the placement before round 0. A simulator uses it to host ring
        neighbours together (their pair masks cancel inside one host's sum). If fewer clients
        than planned advertise keys, `receive_keys` draws a fresh ring over those who did.
        """
        self._expect("keys", "placement")
        if self._ring is None:
            order = sorted(self.clients)
            ring = self._rng.permutation(len(order)) if self.degree < len(order) - 1 else range(len(order))
            self._ring = [order[p] for p in ring]
        return list(self._ring)

    def receive_keys(self, messages: Iterable[AdvertiseKeys]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Store the public keys of U1, build the neighbour graph over U1, and return for each
        client the public keys of its neighbours."""
        self._expect("keys", "receive_keys")
        keys: dict[int, tuple[bytes, bytes]] = {}
        for m in messages:
            if not isinstance(m, AdvertiseKeys):
                raise ProtocolViolation(f"expected AdvertiseKeys, got {type(m).__name__}")
            if m.client not in self.clients:
                raise ProtocolViolation(f"AdvertiseKeys from unknown client {m.client}")
            if m.client in keys:
                raise ProtocolViolation(f"client {m.client} advertised keys twice")
            if len(m.c_pk) != KEY_BYTES or len(m.s_pk) != KEY_BYTES:
                raise ProtocolViolation(f"client {m.client} advertised malformed public keys")
            keys[int(m.client)] = (bytes(m.c_pk), bytes(m.s_pk))
        all_pks = [pk for pair in keys.values() for pk in pair]
        if len(set(all_pks)) != len(all_pks):
            raise ProtocolViolation("two advertised public keys are equal")
        self._require(len(keys), "clients advertised keys")
        order = sorted(keys)
        n = len(order)
        if self.neighbours is None or self.neighbours >= n - 1:
            local = complete_graph(n)
        elif self._ring is not None and len(self._ring) == n:  # everyone planned advertised
            position = {c: p for p, c in enumerate(order)}
            local = harary_from_ring([position[c] for c in self._ring], self.neighbours)
        else:
            local = harary_graph(n, self.neighbours, self._rng)
        self.public_keys = keys
        self.graph = {order[p]: frozenset(order[q] for q in local[p]) for p in range(n)}
        for i in order:
            if len(self.graph[i]) < self.threshold:
                raise SecAggAbort(
                    f"round {self.round_id} aborted: client {i} has {len(self.graph[i])} neighbours "
                    f"among the {n} clients that advertised, fewer than threshold t={self.threshold}"
                )
        self._phase = "shares"
        return {i: {j: keys[j] for j in sorted(self.graph[i])} for i in order}

    # ---- round 1 ---------------------------------------------------------------------------

    def route_shares(self, messages: Iterable[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        """Forward each ciphertext to its receiver (among U2, those who shared); nothing is kept."""
        self._expect("shares", "route_shares")
        by_sender: dict[int, dict[int, bytes]] = {}
        for m in messages:
            if not isinstance(m, EncryptedShares):
                raise ProtocolViolation(f"expected EncryptedShares, got {type(m).__name__}")
            if m.sender not in self.public_keys:
                raise ProtocolViolation(
                    f"EncryptedShares from client {m.sender}, which did not advertise keys"
                )
            if m.sender in by_sender:
                raise ProtocolViolation(f"client {m.sender} sent its shares twice")
            if set(m.shares) != set(self.graph[m.sender]):
                raise ProtocolViolation(
                    f"client {m.sender} must send one ciphertext to each of its {len(self.graph[m.sender])} "
                    f"neighbours, sent to {sorted(m.shares)}"
                )
            by_sender[int(m.sender)] = {int(j): bytes(ct) for j, ct in m.shares.items()}
        shared = frozenset(by_sender)
        self._require(len(shared), "clients shared their keys")
        for i in sorted(shared):
            holders = self.graph[i] & shared
            if len(holders) < self.threshold:
                raise SecAggAbort(
                    f"round {self.round_id} aborted: only {len(holders)} neighbours of client {i} "
                    f"shared keys (they would hold its secret shares), fewer than threshold "
                    f"t={self.threshold}"
                )
        self.shared = shared
        self._phase = "masked"
        return {r: {s: by_sender[s][r] for s in sorted(self.graph[r] & shared)} for r in sorted(shared)}

    # ---- round 2 ---------------------------------------------------------------------------

    def receive_masked(self, message: MaskedInput) -> None:
        """Add one masked input to the running sum (mod 2^bits); the vector itself is not kept."""
        self._expect("masked", "receive_masked")
        if not isinstance(message, MaskedInput):
            raise ProtocolViolation(f"expected MaskedInput, got {type(message).__name__}")
        c = message.client
        if c not in self.shared:
            raise ProtocolViolation(f"masked input from client {c}, which did not share its keys")
        if c in self._received:
            raise ProtocolViolation(f"client {c} sent its masked input twice")
        y = np.asarray(message.y)
        if y.dtype != np.uint64 or y.shape != (self.vector_length,):
            raise ProtocolViolation(
                f"masked input of client {c} must be uint64 of shape ({self.vector_length},), "
                f"got {y.dtype} {y.shape}"
            )
        self._masked_sum += y
        self._masked_sum &= np.uint64((1 << self.bits) - 1)
        self._received.add(int(c))

    def receive_masked_sum(self, clients: Iterable[int], y_sum: np.ndarray) -> None:
        """Add the mod-2^b sum of several clients' masked inputs, summed where they were produced
        (a simulation worker hosting many clients sends one vector). The server learns no more than
        from the individual vectors, which it would add up on arrival anyway."""
        self._expect("masked", "receive_masked_sum")
        ids = [int(c) for c in clients]
        for c in ids:
            if c not in self.shared:
                raise ProtocolViolation(f"masked input from client {c}, which did not share its keys")
            if c in self._received:
                raise ProtocolViolation(f"client {c} sent its masked input twice")
        y = np.asarray(y_sum)
        if y.dtype != np.uint64 or y.shape != (self.vector_length,):
            raise ProtocolViolation(
                f"masked sum must be uint64 of shape ({self.vector_length},), got {y.dtype} {y.shape}"
            )
        self._masked_sum += y
        self._masked_sum &= np.uint64((1 << self.bits) - 1)
        self._received.update(ids)

    def collect_masked(self, messages: Iterable[MaskedInput]) -> UnmaskRequest:
        """Sum the masked inputs as they arrive; then close the phase and name survivors/dropped."""
        for m in messages:
            self.receive_masked(m)
        return self.close_masked()

    def close_masked(self) -> UnmaskRequest:
        """End of round 2: U3 = those who sent a masked input; U2 - U3 are dropped."""
        self._expect("masked", "close_masked")
        self._require(len(self._received), "clients sent masked inputs")
        if len(self._received) < self.survivor_floor:
            raise BelowSurvivorFloor(
                f"round {self.round_id} aborted: {len(self._received)} of the {len(self.clients)} clients survived, "
                f"below the survivor floor ceil(n(1 - {self.dropout:g})) = {self.survivor_floor} the neighbour graph "
                f"is sized for; unmasking refused"
            )
        self.survivors = frozenset(self._received)
        self.dropped = self.shared - self.survivors
        self._phase = "unmask"
        return UnmaskRequest(self.survivors, self.dropped)

    # ---- round 3 ---------------------------------------------------------------------------

    def _validate_unmask(self, m: UnmaskShares, seen: set[int]) -> None:
        if not isinstance(m, UnmaskShares):
            raise ProtocolViolation(f"expected UnmaskShares, got {type(m).__name__}")
        c = m.client
        if c not in self.survivors:
            raise ProtocolViolation(f"unmasking shares from client {c}, which is not a survivor")
        if c in seen:
            raise ProtocolViolation(f"client {c} sent unmasking shares twice")
        both = set(m.self_shares) & set(m.key_shares)
        if both:
            raise ProtocolViolation(
                f"client {c} revealed both the self-mask share and the mask-key share of clients "
                f"{sorted(both)}; rejected (the pair would unmask their inputs)"
            )
        mine = self.graph[c] & self.shared
        bad_self = set(m.self_shares) - (mine & self.survivors)
        if bad_self:
            raise ProtocolViolation(
                f"client {c} sent self-mask shares for {sorted(bad_self)}, not its surviving neighbours"
            )
        bad_key = set(m.key_shares) - (mine & self.dropped)
        if bad_key:
            raise ProtocolViolation(
                f"client {c} sent mask-key shares for {sorted(bad_key)}, not its dropped neighbours"
            )
        for owner, data in list(m.self_shares.items()) + list(m.key_shares.items()):
            try:
                x, _ = shamir.share_from_bytes(bytes(data))
            except ValueError as exc:
                raise ProtocolViolation(
                    f"client {c} sent a malformed share of client {owner}: {exc}"
                ) from exc
            if x != 1 + c:
                raise ProtocolViolation(f"client {c} sent a share of client {owner} that is not its own")

    def unmask(self, messages: Iterable[UnmaskShares]) -> np.ndarray:
        """Reconstruct b_i of survivors and s_d^SK of dropped clients, remove all masks, and
        return sum_{i in U3} q_i mod 2^bits (uint64, shape (vector_length,))."""
        self._expect("unmask", "unmask")
        self._store_revealed(messages)
        self._require(len(self.responders), "survivors sent unmasking shares")
        pair_seeds = self._dropped_pair_seeds()
        self_seeds = {
            i: self._reconstruct("self-mask seed b_i of surviving client", i, self.revealed_self.get(i, {}))
            for i in sorted(self.survivors)
        }
        result = unmask_sum(
            self._masked_sum,
            self.survivors,
            self.dropped,
            self_seeds,
            pair_seeds,
            self.mask_graph,
            self.vector_length,
            self.bits,
        )
        result.flags.writeable = False
        self._result = result
        self._phase = "done"
        return result.copy()

    def _store_revealed(self, messages: Iterable[UnmaskShares]) -> None:
        """Keep the shares the survivors revealed, each message checked whole first; U5 = who sent."""
        seen: set[int] = set()
        for m in messages:
            self._validate_unmask(m, seen)  # the whole message, before storing any of it
            seen.add(int(m.client))
            for i, data in m.self_shares.items():
                self.revealed_self.setdefault(int(i), {})[int(m.client)] = bytes(data)
            for d, data in m.key_shares.items():
                self.revealed_key.setdefault(int(d), {})[int(m.client)] = bytes(data)
        # Guard: never both kinds of secret for one client.
        assert not set(self.revealed_self) & set(self.revealed_key)
        self.responders = frozenset(seen)

    def _reconstruct(self, kind: str, owner: int, shares: dict[int, bytes]) -> bytes:
        t = self.threshold
        if len(shares) < t:
            raise SecAggAbort(
                f"round {self.round_id} aborted: cannot reconstruct the {kind} {owner}: "
                f"{len(shares)} shares arrived, threshold t={t}"
            )
        points = [shamir.share_from_bytes(shares[h]) for h in sorted(shares)]
        try:
            return shamir.reconstruct(points, t)
        except ValueError as exc:
            raise SecAggAbort(
                f"round {self.round_id} aborted: shares of the {kind} of client {owner} are inconsistent: {exc}"
            ) from exc

    def _dropped_pair_seeds(self) -> dict[int, dict[int, bytes]]:
        """{d: {i: s_di}}: the pair seeds of each dropped client d with its surviving neighbours i,
        from d's reconstructed mask key."""
        pair_seeds: dict[int, dict[int, bytes]] = {}
        for d in sorted(self.dropped):
            partners = self.graph[d] & self.survivors
            if not partners:
                continue  # no survivor masked with d: nothing dangling to remove
            sk = self._dropped_mask_key(d)
            pair_seeds[d] = {
                i: shared_seed(sk, self.public_keys[i][1], pair_info(MASK_PURPOSE, self.round_id, d, i))
                for i in sorted(partners)
            }
        return pair_seeds

    def _dropped_mask_key(self, d: int) -> X25519PrivateKey:
        """Dropped client d's mask private key s_d^SK, reconstructed and checked against its public key."""
        sk_bytes = self._reconstruct(
            "mask private key s_d^SK of dropped client", d, self.revealed_key.get(d, {})
        )
        try:
            sk, pk = keypair_from_bytes(sk_bytes)
        except ValueError as exc:
            raise SecAggAbort(f"reconstructed mask key of dropped client {d} is malformed: {exc}") from exc
        if pk != self.public_keys[d][1]:
            raise SecAggAbort(
                f"round {self.round_id} aborted: reconstructed mask key of dropped client {d} "
                f"does not match its advertised public key"
            )
        return sk
