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

import numpy as np

from fedmeta.actors.secagg.client import SecAggClient
from fedmeta.actors.secagg.keys import ShareDecryptionError
from fedmeta.actors.secagg.messages import (
    PHASES,
    AdvertiseKeys,
    BelowSurvivorFloor,
    EncryptedShares,
    MaskedInput,
    ProtocolViolation,
    SecAggAbort,
    UnmaskRequest,
    UnmaskShares,
)
from fedmeta.actors.secagg.server import SecAggServer

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
    drop, ids, n = _round_inputs(vectors, drop)

    child = rng.spawn(len(ids) + 1)
    server = SecAggServer(
        round_id, ids, k, t, bits, n, child[0], allow_low_threshold=allow_low_threshold, dropout=dropout
    )
    clients = {c: SecAggClient(c, round_id, bits, t, g) for c, g in zip(ids, child[1:])}

    keys = server.receive_keys([clients[c].advertise() for c in ids if c not in drop["advertise"]])
    inboxes = server.route_shares(
        [clients[c].share_keys(keys[c]) for c in sorted(keys) if c not in drop["share"]]
    )
    request = server.collect_masked(
        clients[c].masked_input(vectors[c], inboxes[c]) for c in sorted(inboxes) if c not in drop["masked"]
    )
    total = server.unmask(
        [clients[c].unmask(request) for c in sorted(request.survivors) if c not in drop["unmask"]]
    )
    return total, server


def _round_inputs(
    vectors: Mapping[int, np.ndarray], drop: Mapping[str, Iterable[int]] | None
) -> tuple[dict[str, set[int]], list[int], int]:
    """`run_round`'s arguments checked: the dropouts of every phase, the client ids, the vector length."""
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
    return drop, ids, n
