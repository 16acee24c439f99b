"""The secure-aggregation round as message-passing state machines (client and server).

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS'17, figure 4, honest-but-curious variant) restricted to a random k-regular Harary neighbour
graph as in SecAgg+ (Bell et al. 2020, CCS'20). Four rounds, each a list of messages from the
clients that are still alive to the server and one answer from the server:

    round 0  AdvertiseKeys   client -> server   c_i^PK (share encryption), s_i^PK (masking)
             server.receive_keys -> {client: {neighbour: (c_PK, s_PK)}}   (builds the graph on U1)
    round 1  EncryptedShares client -> server   AES-GCM(Shamir shares of b_i and s_i^SK) per neighbour
             server.route_shares -> {receiver: {sender: ciphertext}}     (U2 = who shared)
    round 2  MaskedInput     client -> server   y_i = q_i + PRG(b_i) + sum_j sgn(i,j) PRG(s_ij)
             server.collect_masked -> UnmaskRequest(survivors=U3, dropped=U2 - U3)
    round 3  UnmaskShares    client -> server   shares of b_j (j surviving), of s_j^SK (j dropped)
             server.unmask -> sum_{i in U3} q_i mod 2^b

U1 (advertised) >= U2 (shared) >= U3 (sent a masked input) >= U5 (sent unmasking shares).
A client in U1 - U2 is simply left out: nobody masks with it (a client masks only with the
neighbours whose ciphertexts reached it, i.e. N(i) & U2). A client in U2 - U3 is "dropped": its
neighbours' dangling pairwise masks are removed with s_ij recomputed from its reconstructed
s_d^SK. A client in U3 - U5 is still a survivor: its b_i comes from its neighbours' shares.

Cryptography (all from `keys`, `shamir`, `prg`, `masking`):
- pairwise mask seed  s_ij = HKDF(X25519(s_i^SK, s_j^PK), pair_info(b"mask", round, i, j));
- share key           k_ij = HKDF(X25519(c_i^SK, c_j^PK), pair_info(b"share", round, i, j)),
  the same key both ways, so the AES-GCM nonce is the sender id (each key encrypts exactly two
  messages, with distinct nonces), and the associated data binds (round, sender, receiver);
- Shamir shares of b_i and of s_i^SK with threshold t, evaluated at x = 1 + receiver id.

Design note -- what the server holds. `SecAggServer` only ever stores: the clients' public keys
and the graph; the running SUM of masked vectors (each y_i is added mod 2^b on arrival and never
kept; ciphertexts are routed, not stored); the plaintext shares revealed in the unmasking round;
and the final unmasked sum. `held_vectors()` returns every numpy array it stores, so tests can
check that none of them is an individual client's vector or a partially masked one. The server
never learns both b_i and s_i^SK of one client: survivors and dropped clients are disjoint in the
one UnmaskRequest, clients refuse to reveal both kinds of share for a neighbour (even across
calls), and the server rejects any message that does.

Thresholds. 1 <= t <= k (a secret shared among k neighbours must be recoverable from them), and
by default t > k/2 as in Bonawitz et al. With t <= k/2 (opt-in `allow_low_threshold=True`) two
disjoint groups of t neighbours could each reconstruct a different secret of the same client; a
server that lies about who dropped (sending different UnmaskRequests to different clients --
outside this honest-but-curious simulation, where the request is one object) could then learn
b_i and s_i^SK together and unmask q_i. Lower t tolerates more dropouts, weaker security.

Survivor floor. A server given `dropout` (delta, what the neighbour graph's k and t were sized
for: `params`) refuses to unmask when fewer than ceil(n (1 - delta)) of the n clients it opened the
round with sent a masked input (`BelowSurvivorFloor`, before the UnmaskRequest goes out, so no
share is revealed): with more dropped than delta the graph's security and correctness bounds do
not hold, whatever t says (federated-compute's server has the same floor). n counts every client
invited to key set-up, so a client that never advertised counts as dropped (stricter than counting
U1 only).

Scope: honest-but-curious (semi-honest) server and clients: there is no consistency-check round
and no signatures on the advertised keys (the malicious-server variant of Bonawitz et al. adds
both). Key material is drawn from numpy Generators: SIMULATION ONLY (see `keys`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np

from fedmeta.actors.secagg import shamir
from fedmeta.actors.secagg.graph import complete_graph, harary_from_ring, harary_graph
from fedmeta.actors.secagg.keys import (
    KEY_BYTES,
    NONCE_BYTES,
    ShareDecryptionError,
    decrypt_share,
    draw_private_bytes,
    encrypt_share,
    keypair_from_bytes,
    pair_info,
    shared_seed,
)
from fedmeta.actors.secagg.masking import mask_vector, unmask_sum
from fedmeta.actors.secagg.params import survivor_floor
from fedmeta.actors.secagg.quantize import MAX_BITS

__all__ = [
    "PHASES",
    "AdvertiseKeys",
    "BelowSurvivorFloor",
    "EncryptedShares",
    "MaskedInput",
    "ProtocolViolation",
    "SecAggAbort",
    "SecAggClient",
    "SecAggServer",
    "ShareDecryptionError",
    "UnmaskRequest",
    "UnmaskShares",
    "run_round",
]

MASK_PURPOSE = b"mask"
SHARE_PURPOSE = b"share"
PHASES = ("advertise", "share", "masked", "unmask")
_SHARE_BYTES = shamir.SHARE_BYTES


class SecAggAbort(RuntimeError):
    """The round cannot complete: too few clients or shares (below the threshold t) remain."""


class BelowSurvivorFloor(SecAggAbort):
    """Fewer clients survived than the neighbour graph was sized for: unmasking is refused."""


class ProtocolViolation(ValueError):
    """A message breaks the protocol (wrong phase, unknown sender, both shares revealed, ...)."""


# --------------------------------------------------------------------------------------------
# Messages (immutable; only ints, bytes, numpy arrays and containers of them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0: client's two X25519 public keys (raw 32 bytes each)."""

    client: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1: {neighbour: AES-GCM ciphertext of (share of b_sender || share of s_sender^SK)}."""

    sender: int
    shares: dict[int, bytes]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2: the masked vector y (uint64, values < 2^bits)."""

    client: int
    y: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> clients after round 2: who sent a masked input (survivors) and who shared keys
    but did not (dropped)."""

    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3: plaintext Shamir shares revealed by `client`: of b_i for surviving neighbours i
    (`self_shares`), of s_i^SK for dropped neighbours i (`key_shares`); never both for one i."""

    client: int
    self_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers shared by both sides
# --------------------------------------------------------------------------------------------


def _share_ad(round_id: int, sender: int, receiver: int) -> bytes:
    """AES-GCM associated data: binds a ciphertext to (round, sender, receiver), directed."""
    return b"fedmeta-secagg-share|%d|%d|%d" % (round_id, sender, receiver)


def _share_nonce(sender: int) -> bytes:
    """The key k_ij is shared by both directions; the sender id keeps the two nonces distinct."""
    return int(sender).to_bytes(NONCE_BYTES, "big")


def _check_id(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    if value >= 2**63:
        raise ValueError(f"{what} must be < 2^63, got {value!r}")
    return int(value)


def _check_bits_arg(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def _check_threshold(threshold, degree: int, allow_low_threshold: bool) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
        raise ValueError(f"threshold must be an integer, got {threshold!r}")  # noqa: TRY004
    t = int(threshold)
    if t < 1:
        raise ValueError(f"threshold t={t} must be >= 1")
    if t > degree:
        raise ValueError(
            f"threshold t={t} exceeds the number of neighbours k={degree} each client shares its "
            f"secrets with: they could never be reconstructed; use threshold <= {degree}"
        )
    if 2 * t <= degree and not allow_low_threshold:
        raise ValueError(
            f"threshold t={t} must be > k/2 = {degree / 2:g} (Bonawitz et al.): with t <= k/2 two "
            f"disjoint groups of neighbours could reveal both the self-mask seed and the mask key "
            f"of one client; pass allow_low_threshold=True to accept that risk"
        )
    return t


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class SecAggClient:
    """One client's side of the round: advertise -> share_keys -> masked_input -> unmask."""

    def __init__(self, client_id: int, round_id: int, bits: int, threshold: int, rng: np.random.Generator):
        self.client_id = _check_id(client_id, "client_id")
        self.round_id = _check_id(round_id, "round_id")
        self.bits = _check_bits_arg(bits)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 1:
            raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")
        self.threshold = int(threshold)
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator")
        self._rng = rng
        self._phase = "new"
        self._c_sk = self._s_sk = None
        self._s_sk_bytes = b""
        self._self_seed = b""
        self._neighbour_keys: dict[int, tuple[bytes, bytes]] = {}
        self._inbox: dict[int, bytes] = {}
        # Which kind of share this client has revealed for each neighbour ("self" or "key").
        self._revealed: dict[int, str] = {}

    def _expect(self, phase: str, step: str) -> None:
        if self._phase != phase:
            raise ProtocolViolation(
                f"client {self.client_id}: {step} called in phase {self._phase!r}, expected {phase!r}"
            )

    def advertise(self) -> AdvertiseKeys:
        """Round 0: draw the two key pairs and the self-mask seed b_i; publish the public keys."""
        self._expect("new", "advertise")
        self._c_sk, c_pk = keypair_from_bytes(draw_private_bytes(self._rng))
        self._s_sk_bytes = draw_private_bytes(self._rng)
        self._s_sk, s_pk = keypair_from_bytes(self._s_sk_bytes)
        self._self_seed = draw_private_bytes(self._rng)  # b_i, the PRG seed of the self mask
        self._phase = "advertised"
        return AdvertiseKeys(self.client_id, c_pk, s_pk)

    def share_keys(self, neighbour_keys: Mapping[int, tuple[bytes, bytes]],
                   pair_keys: dict[bytes, bytes] | None = None) -> EncryptedShares:
        """Round 1: Shamir-share b_i and s_i^SK among the neighbours, encrypt one bundle each.

        `pair_keys`: a dict shared by the clients one simulation process hosts. A pair's key is
        the same at both ends (X25519 is symmetric), so the second of two co-hosted neighbours
        takes the one the first derived instead of repeating the agreement: the same bytes, half
        the curve operations."""
        self._expect("advertised", "share_keys")
        keys: dict[int, tuple[bytes, bytes]] = {}
        for j, pair in neighbour_keys.items():
            j = _check_id(j, "neighbour id")
            if j == self.client_id:
                raise ProtocolViolation(f"client {self.client_id} was given itself as a neighbour")
            c_pk, s_pk = pair
            if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
                raise ProtocolViolation(f"client {self.client_id}: malformed public keys for neighbour {j}")
            keys[j] = (bytes(c_pk), bytes(s_pk))
        if len(keys) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id} has {len(keys)} neighbours, fewer than threshold "
                f"t={self.threshold}: its secrets could not be reconstructed"
            )
        order = sorted(keys)
        xs = [1 + j for j in order]
        b_shares = shamir.split(self._self_seed, len(order), self.threshold, self._rng, xs=xs)
        s_shares = shamir.split(self._s_sk_bytes, len(order), self.threshold, self._rng, xs=xs)
        out: dict[int, bytes] = {}
        # one key per pair, both directions (pair_info orders the pair): kept to decrypt j's bundle
        # in round 3 without a second key exchange
        self._share_keys: dict[int, bytes] = {}
        for j, sb, ss in zip(order, b_shares, s_shares):
            info = pair_info(SHARE_PURPOSE, self.round_id, self.client_id, j)
            key = pair_keys.pop(info, None) if pair_keys is not None else None
            if key is None:
                key = shared_seed(self._c_sk, keys[j][0], info)
                if pair_keys is not None:
                    pair_keys[info] = key
            self._share_keys[j] = key
            plaintext = shamir.share_to_bytes(sb) + shamir.share_to_bytes(ss)
            out[j] = encrypt_share(
                key, plaintext, _share_ad(self.round_id, self.client_id, j), _share_nonce(self.client_id)
            )
        self._neighbour_keys = keys
        self._phase = "shared"
        return EncryptedShares(self.client_id, out)

    def masked_input(self, q: np.ndarray, inbox: Mapping[int, bytes],
                     cancels: AbstractSet[int] = frozenset()) -> MaskedInput:
        """Round 2: y_i = q_i + PRG(b_i) + sum_{j in inbox} sgn(i, j) PRG(s_ij) mod 2^bits.

        `inbox` holds the ciphertexts addressed to this client; their senders are exactly the
        neighbours that got through ShareKeys, and only they are masked with.

        `cancels`: neighbours whose masked inputs are added to this one *before* anything leaves
        the place that hosts both (a simulation worker summing its clients). Their pair masks
        enter that sum once with each sign and cancel exactly, so they are not expanded: the sum
        that leaves is bit-for-bit the same, and the individual y_i returned is then only
        meaningful inside that sum. Both ends must pass each other in `cancels`.
        """
        self._expect("shared", "masked_input")
        q = np.asarray(q)
        if q.ndim != 1 or q.dtype != np.uint64:
            raise ValueError(f"q must be a 1-D uint64 vector, got dtype {q.dtype} and shape {q.shape}")
        if q.size and int(q.max()) >> self.bits:
            raise ValueError(f"q has elements >= 2^{self.bits}: quantize it into Z_(2^bits) first")
        unknown = set(inbox) - set(self._neighbour_keys)
        if unknown:
            raise ProtocolViolation(f"client {self.client_id} got ciphertexts from non-neighbours {sorted(unknown)}")
        if len(inbox) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: only {len(inbox)} neighbours shared keys, fewer than "
                f"threshold t={self.threshold}"
            )
        self._inbox = {int(j): bytes(ct) for j, ct in inbox.items()}
        masked_with = [j for j in self._inbox if j not in cancels]
        seeds = {   # the seeds of cancelled pairs are never needed, so never agreed on
            j: shared_seed(self._s_sk, self._neighbour_keys[j][1], pair_info(MASK_PURPOSE, self.round_id, self.client_id, j))
            for j in masked_with
        }
        y = mask_vector(q, self._self_seed, self.client_id, masked_with, seeds, self.bits)
        y.flags.writeable = False
        self._phase = "masked"
        return MaskedInput(self.client_id, y)

    def _decrypt(self, j: int) -> tuple[bytes, bytes]:
        """(share of b_j, share of s_j^SK) addressed to this client; ShareDecryptionError if tampered."""
        plain = decrypt_share(self._share_keys[j], self._inbox[j], _share_ad(self.round_id, j, self.client_id), _share_nonce(j))
        if len(plain) != 2 * _SHARE_BYTES:
            raise ShareDecryptionError(f"share bundle from client {j} has the wrong length")
        b_share, s_share = plain[:_SHARE_BYTES], plain[_SHARE_BYTES:]
        for s in (b_share, s_share):
            if shamir.share_from_bytes(s)[0] != 1 + self.client_id:
                raise ShareDecryptionError(f"share from client {j} is not evaluated at this client's point")
        return b_share, s_share

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Round 3: reveal the share of b_j for surviving neighbours j and of s_j^SK for dropped
        ones; refuses to reveal both kinds for any neighbour, in this call or across calls."""
        if self._phase not in ("masked", "unmasked"):
            raise ProtocolViolation(f"client {self.client_id}: unmask called in phase {self._phase!r}")
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        both = survivors & dropped
        if both:
            raise ProtocolViolation(f"client {self.client_id}: clients {sorted(both)} listed as surviving and dropped")
        if self.client_id not in survivors:
            raise ProtocolViolation(f"client {self.client_id} sent its masked input but is not listed as a survivor")
        if len(survivors) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: only {len(survivors)} survivors, fewer than threshold t={self.threshold}"
            )
        plan: dict[int, str] = {}
        for j in self._inbox:
            if j in survivors:
                kind = "self"
            elif j in dropped:
                kind = "key"
            else:
                raise ProtocolViolation(
                    f"client {self.client_id}: neighbour {j} shared keys but is neither surviving nor dropped"
                )
            if self._revealed.get(j, kind) != kind:
                raise ProtocolViolation(
                    f"client {self.client_id} already revealed the {self._revealed[j]} share of client "
                    f"{j}; revealing the {kind} share too would unmask its input"
                )
            plan[j] = kind
        self_shares: dict[int, bytes] = {}
        key_shares: dict[int, bytes] = {}
        for j in sorted(plan):
            b_share, s_share = self._decrypt(j)  # all decrypted before anything is recorded
            (self_shares if plan[j] == "self" else key_shares)[j] = b_share if plan[j] == "self" else s_share
        self._revealed.update(plan)
        self._phase = "unmasked"
        return UnmaskShares(self.client_id, self_shares, key_shares)


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


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
        if isinstance(clients, (int, np.integer)) and not isinstance(clients, bool):
            ids = list(range(int(clients)))
        else:
            ids = [_check_id(c, "client id") for c in clients]
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be distinct")
        if len(ids) < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {len(ids)}")
        self.clients = frozenset(ids)
        n = len(ids)
        self.dropout = dropout
        self.survivor_floor = 0 if dropout is None else survivor_floor(n, dropout)
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
        self.neighbours = None if neighbours is None else int(neighbours)
        self.degree = degree
        self.threshold = _check_threshold(threshold, degree, allow_low_threshold)
        self.bits = _check_bits_arg(bits)
        if isinstance(vector_length, bool) or not isinstance(vector_length, (int, np.integer)) or vector_length < 1:
            raise ValueError(f"vector_length must be a positive integer, got {vector_length!r}")
        self.vector_length = int(vector_length)
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
                f"round {self.round_id} aborted: only {count} {what}, fewer than threshold "
                f"t={self.threshold}"
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
        elif self._ring is not None and len(self._ring) == n:   # everyone planned advertised
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
                raise ProtocolViolation(f"EncryptedShares from client {m.sender}, which did not advertise keys")
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
        return {
            r: {s: by_sender[s][r] for s in sorted(self.graph[r] & shared)} for r in sorted(shared)
        }

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
            raise ProtocolViolation(f"masked sum must be uint64 of shape ({self.vector_length},), got {y.dtype} {y.shape}")
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
            raise ProtocolViolation(f"client {c} sent self-mask shares for {sorted(bad_self)}, not its surviving neighbours")
        bad_key = set(m.key_shares) - (mine & self.dropped)
        if bad_key:
            raise ProtocolViolation(f"client {c} sent mask-key shares for {sorted(bad_key)}, not its dropped neighbours")
        for owner, data in list(m.self_shares.items()) + list(m.key_shares.items()):
            try:
                x, _ = shamir.share_from_bytes(bytes(data))
            except ValueError as exc:
                raise ProtocolViolation(f"client {c} sent a malformed share of client {owner}: {exc}") from exc
            if x != 1 + c:
                raise ProtocolViolation(f"client {c} sent a share of client {owner} that is not its own")

    def unmask(self, messages: Iterable[UnmaskShares]) -> np.ndarray:
        """Reconstruct b_i of survivors and s_d^SK of dropped clients, remove all masks, and
        return sum_{i in U3} q_i mod 2^bits (uint64, shape (vector_length,))."""
        self._expect("unmask", "unmask")
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
        self._require(len(self.responders), "survivors sent unmasking shares")
        t = self.threshold

        def reconstruct(kind: str, owner: int, shares: dict[int, bytes]) -> bytes:
            if len(shares) < t:
                raise SecAggAbort(
                    f"round {self.round_id} aborted: cannot reconstruct the {kind} {owner}: "
                    f"{len(shares)} shares arrived, threshold t={t}"
                )
            points = [shamir.share_from_bytes(shares[h]) for h in sorted(shares)]
            try:
                return shamir.reconstruct(points, t)
            except ValueError as exc:
                raise SecAggAbort(f"round {self.round_id} aborted: shares of the {kind} of client {owner} are inconsistent: {exc}") from exc

        pair_seeds: dict[int, dict[int, bytes]] = {}
        for d in sorted(self.dropped):
            partners = self.graph[d] & self.survivors
            if not partners:
                continue  # no survivor masked with d: nothing dangling to remove
            sk_bytes = reconstruct("mask private key s_d^SK of dropped client", d, self.revealed_key.get(d, {}))
            try:
                sk, pk = keypair_from_bytes(sk_bytes)
            except ValueError as exc:
                raise SecAggAbort(f"reconstructed mask key of dropped client {d} is malformed: {exc}") from exc
            if pk != self.public_keys[d][1]:
                raise SecAggAbort(
                    f"round {self.round_id} aborted: reconstructed mask key of dropped client {d} "
                    f"does not match its advertised public key"
                )
            pair_seeds[d] = {
                i: shared_seed(sk, self.public_keys[i][1], pair_info(MASK_PURPOSE, self.round_id, d, i))
                for i in sorted(partners)
            }
        self_seeds = {
            i: reconstruct("self-mask seed b_i of surviving client", i, self.revealed_self.get(i, {}))
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


# --------------------------------------------------------------------------------------------
# In-process simulation of a whole round
# --------------------------------------------------------------------------------------------


def run_round(
    vectors: Mapping[int, np.ndarray],
    k: int | None,
    t: int,
    bits: int,
    rng: np.random.Generator,
    drop: Mapping[str, Iterable[int]] | None = None,
    *,
    round_id: int = 0,
    allow_low_threshold: bool = False,
    dropout: float | None = None,
) -> tuple[np.ndarray, SecAggServer]:
    """Simulate one secure-aggregation round over `vectors` ({client id: quantized uint64 q_i}).

    `drop` maps a phase in PHASES to the clients that fail to send that phase's message (and
    therefore every later one): "advertise", "share", "masked" (shared keys, no masked input:
    dropped), "unmask" (sent the masked input, no unmasking shares: still a survivor).
    Returns (sum of the survivors' q_i mod 2^bits, the server). Raises SecAggAbort when too few
    clients or shares remain (`BelowSurvivorFloor`, with `dropout`: fewer survivors than the
    floor). Client and server randomness are spawned from `rng`.
    """
    drop = {p: set() for p in PHASES} | {p: {int(c) for c in s} for p, s in (drop or {}).items()}
    unknown_phases = set(drop) - set(PHASES)
    if unknown_phases:
        raise ValueError(f"unknown dropout phases {sorted(unknown_phases)}; use {PHASES}")
    ids = sorted(int(c) for c in vectors)
    if not ids:
        raise ValueError("no client vectors")
    lengths = {np.asarray(v).shape for v in vectors.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"client vectors must be 1-D of one common length, got shapes {sorted(lengths)}")
    n = next(iter(lengths))[0]
    for p, s in drop.items():
        if not s <= set(ids):
            raise ValueError(f"drop[{p!r}] names unknown clients {sorted(s - set(ids))}")

    child = rng.spawn(len(ids) + 1)
    server = SecAggServer(round_id, ids, k, t, bits, n, child[0], allow_low_threshold=allow_low_threshold,
                          dropout=dropout)
    clients = {c: SecAggClient(c, round_id, bits, t, g) for c, g in zip(ids, child[1:])}

    keys = server.receive_keys([clients[c].advertise() for c in ids if c not in drop["advertise"]])
    inboxes = server.route_shares([clients[c].share_keys(keys[c]) for c in sorted(keys) if c not in drop["share"]])
    request = server.collect_masked(
        clients[c].masked_input(vectors[c], inboxes[c]) for c in sorted(inboxes) if c not in drop["masked"]
    )
    total = server.unmask([clients[c].unmask(request) for c in sorted(request.survivors) if c not in drop["unmask"]])
    return total, server
