"""Secure aggregation for one experiment: its parameters, derived once from the config, and the
server side of one secure sum (`SecureSum`), the session the aggregator keeps per protocol round.

Updates are L2-clipped to C (`privacy.clip_norm`, so every coordinate is within [-C, C]) and
quantized with step C / 2^quant_bits; the modulus 2^bits is the smallest for which the sum of a
full cohort cannot wrap (`quantize.check_no_overflow`). t defaults to k // 2 + 1: a strict majority
of each client's neighbours, the smallest threshold for which two disjoint groups of neighbours
cannot both reconstruct (Bonawitz et al. 2017, Sec. 4).

A session refuses what its graph was not sized for: unmasking with fewer survivors than
ceil(n (1 - dropout)) of the n clients it opened with (the protocol's survivor floor), and a cohort
above the largest size k and t were chosen for (`cohort_range`: a Poisson cohort past its 2^-20
quantile). Either aborts the round: nothing is released.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fedmeta.actors.messages import MaskedUpdate, SummedUpdates, wire_bytes
from fedmeta.actors.secagg.protocol import (
    AdvertiseKeys,
    BelowSurvivorFloor,
    EncryptedShares,
    MaskedInput,
    SecAggServer,
    UnmaskRequest,
    UnmaskShares,
)
from fedmeta.actors.secagg.quantize import check_no_overflow, dequantize


@dataclass(frozen=True)
class SecAggParams:
    neighbors: int | None  # k; None = complete graph
    threshold: int  # t
    clip: float  # C
    step: float  # quantization step
    bits: int  # modulus 2^bits
    noise_multiplier: float = 0.0  # distributed DP: z of the Skellam shares (0: none)
    cohort: int = 1  # expected clients per round (each adds 1/cohort of the noise)
    max_clients: int = 0  # the most clients one sum may have without wrapping (0: cohort)
    allow_low_threshold: bool = False  # t <= k/2: sized for a server that follows the protocol (protocol.py)
    dropout: float | None = (
        None  # delta k and t are sized for: fewer than ceil(n (1 - delta)) survivors are refused
    )
    cohort_range: tuple[int, int] | None = (
        None  # the cohort sizes k and t are sized for (None: exactly `cohort`)
    )

    def facts(self) -> dict:
        """What the summary and the model card report about the protocol."""
        return {
            "secure_aggregation": True,
            "secagg_neighbors": self.neighbors or "complete",
            "secagg_threshold": self.threshold,
            "secagg_bits": self.bits,
        }


def secagg_params(
    neighbors: int | None,
    threshold: int | None,
    clip_norm: float,
    quant_bits: int,
    cohort: int,
    noise_multiplier: float = 0.0,
    max_clients: int | None = None,
    allow_low_threshold: bool = False,
    dropout: float | None = None,
    cohort_range: tuple[int, int] | None = None,
) -> SecAggParams:
    """`cohort` is the (expected) number of clients; `max_clients` bounds a variable (Poisson)
    cohort: the modulus is sized so that many clients' sum cannot wrap. `dropout` and
    `cohort_range`: what k and t were sized for (`SecAggParams`)."""
    if cohort < 2:
        raise ValueError(
            f"federation.clients_per_round: secure aggregation needs at least 2 clients, got {cohort}"
        )
    degree = cohort - 1 if neighbors is None else min(neighbors, cohort - 1)
    t = threshold if threshold is not None else degree // 2 + 1
    if not 1 <= t <= degree:
        raise ValueError(f"secagg.threshold: must be in [1, {degree}] (the mask graph's degree), got {t}")
    step = clip_norm / 2**quant_bits
    # distributed noise: the summed Skellam noise has std z*C (in value units); leave room for a
    # 10-sigma tail, i.e. as much range as ceil(10 z) more clients at full clip
    headroom = math.ceil(10 * noise_multiplier)
    most = max(cohort, max_clients or cohort)
    try:
        bits = check_no_overflow(most + headroom, clip_norm, step)
    except ValueError as e:
        raise ValueError(f"secagg.quant_bits: {e}") from None
    return SecAggParams(
        neighbors,
        t,
        clip_norm,
        step,
        bits,
        noise_multiplier,
        cohort,
        most,
        allow_low_threshold,
        dropout,
        cohort_range,
    )


class SecureSum:
    """One execution of the secure-sum protocol, server side (Bonawitz et al. 2017, Sec. 4): the
    same four phases whatever the clients sum, a round's clipped updates or an evaluation panel's
    accuracies. The server only ever holds public keys, ciphertexts it cannot read, the running
    masked sum and the shares revealed for unmasking; `unmask` returns the decoded total."""

    def __init__(
        self,
        protocol_id: int,
        clients: Iterable[int],
        params: SecAggParams,
        dim: int,
        rng: np.random.Generator,
    ):
        clients = list(clients)
        if params.max_clients and len(clients) > params.max_clients:  # a Poisson cohort far in its tail
            raise ValueError(
                f"{len(clients)} clients exceed the {params.max_clients} the modulus is sized for"
            )
        if params.cohort_range and len(clients) > params.cohort_range[1]:  # k and t hold up to there only
            raise ValueError(
                f"{len(clients)} clients exceed the {params.cohort_range[1]} the neighbour graph is sized for"
            )
        self.params = params
        self.server = SecAggServer(
            protocol_id,
            clients,
            params.neighbors,
            params.threshold,
            params.bits,
            dim,
            rng,
            allow_low_threshold=params.allow_low_threshold,
            dropout=params.dropout,
        )
        self._clients = 0
        # communication accounting: the bytes of every message each client sends and receives
        self.up: Counter[int] = Counter()
        self.down: Counter[int] = Counter()

    def placement(self) -> list[int]:
        """The ring placement of the mask graph (known before any key: hosts place neighbours together)."""
        return self.server.placement()

    def keys(self, adverts: Iterable[AdvertiseKeys]) -> dict[int, dict]:
        """Phase 0: public keys in; each client's neighbours' keys out."""
        adverts = list(adverts)
        self.up.update({a.client: wire_bytes(a) for a in adverts})
        return self._sent(self.server.receive_keys(adverts))

    def route(self, shares: Iterable[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        """Phase 1: route the encrypted shares (unreadable to the server)."""
        shares = list(shares)
        self.up.update({x.sender: wire_bytes(x) for x in shares})
        return self._sent(self.server.route_shares(shares))

    def _sent(self, answers: dict[int, object]) -> dict[int, object]:
        self.down.update({c: wire_bytes(a) for c, a in answers.items()})
        return answers

    def collect(self, messages: Sequence[MaskedUpdate]) -> UnmaskRequest:
        """Phase 2: add the workers' masked sums; name the survivors and the dropped."""
        for m in messages:
            self.server.receive_masked_sum(m.client_ids, m.masked_sum)
        self._clients = sum(m.num_clients for m in messages)
        try:
            request = self.server.close_masked()
        except BelowSurvivorFloor as e:
            raise BelowSurvivorFloor(
                f"{e} (secagg.dropout_rate: at most {self.params.dropout:g} of a cohort may "
                f"drop after key set-up)"
            ) from None
        # each survivor sent its own masked vector (a worker's sum has the same shape) and
        # receives the request
        sent = next((m for m in messages if m.client_ids), None)
        masked = wire_bytes(MaskedInput(sent.client_ids[0], sent.masked_sum)) if sent else 0
        asked = wire_bytes(request)
        for c in request.survivors:
            self.up[c] += masked
            self.down[c] += asked
        return request

    def unmask(self, reveals: Iterable[UnmaskShares]) -> SummedUpdates:
        """Phase 3: unmask the sum from the revealed shares and decode it; its weight is the
        number of survivors (each contributed weight 1)."""
        reveals = list(reveals)
        total = dequantize(self.server.unmask(reveals), self.params.step, self.params.bits)  # float64
        self.up.update({u.client: wire_bytes(u) for u in reveals})
        survivors = self.server.survivors
        metrics = {
            "clients": self._clients,
            "secagg_survivors": len(survivors),
            "secagg_dropped": len(self.server.dropped),
            # everyone's traffic in the totals; per client: what a reporting client sent and received
            "bytes_up": sum(self.up.values()),
            "bytes_down": sum(self.down.values()),
            "bytes_up_per_client": sum(self.up[c] for c in survivors) / max(len(survivors), 1),
            "bytes_down_per_client": sum(self.down[c] for c in survivors) / max(len(survivors), 1),
        }
        return SummedUpdates(total, float(len(self.server.survivors)), metrics)
