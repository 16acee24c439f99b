"""A worker's side of secure aggregation: the clients it hosts run the SecAgg+ client protocol
(actors/secagg/client.py) for a round's update or for the panel's metric, and the worker sends
one masked sum of its clients' inputs, never an unmasked one."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from fedmeta.actors.messages import (
    METRIC_KEYS,
    MaskedUpdate,
    ProtocolStateLost,
)
from fedmeta.actors.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShares,
    SecAggClient,
    UnmaskRequest,
    UnmaskShares,
)
from fedmeta.actors.secagg.quantize import add_mod, quantize
from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.sim.seeding import Secrets


class SecureClientSide:
    """Mixed into ClientWorker (client_worker.py)."""

    # ------------------------------------------------------------ secure sums (client side)
    def secure_advertise(
        self,
        protocol_id: int,
        cids: Sequence[int],
        params: SecAggParams,
        keys: dict[int, Secrets] | None = None,
    ) -> list[AdvertiseKeys]:
        """Phase 0: every client of this shard makes its key pairs (its state lives here, as on its
        device) from its key for this protocol round (`keys`). One session is open at a time: a new
        one forgets an aborted one."""
        keys = self._keys(protocol_id, cids, keys)
        clients = {
            int(c): SecAggClient(
                int(c),
                protocol_id,
                params.bits,
                params.threshold,
                keys[int(c)].np_rng("secagg-client", protocol_id, int(c)),
            )
            for c in cids
        }
        self._session = {protocol_id: (params, clients)}
        self._session_keys = {int(c): keys[int(c)] for c in cids}
        return [client.advertise() for client in clients.values()]

    def _protocol(self, protocol_id: int) -> tuple[SecAggParams, dict[int, SecAggClient]]:
        if protocol_id not in self._session:  # e.g. Ray restarted this worker mid-protocol
            raise ProtocolStateLost(
                f"worker {self.worker_id}: no secure-aggregation state for protocol round "
                f"{protocol_id}: its clients drop out"
            )
        return self._session[protocol_id]

    def secure_share(self, protocol_id: int, neighbour_keys: dict[int, dict]) -> list[EncryptedShares]:
        """Phase 1: Shamir shares of each client's secrets, encrypted for its neighbours.
        `neighbour_keys` is the server's answer for the cohort; each client here reads its entry."""
        _, clients = self._protocol(protocol_id)
        pair_keys: dict[bytes, bytes] = {}  # co-hosted neighbours derive each pair's key once
        return [
            client.share_keys(neighbour_keys[c], pair_keys)
            for c, client in clients.items()
            if c in neighbour_keys
        ]

    def secure_unmask(self, protocol_id: int, request: UnmaskRequest) -> list[UnmaskShares]:
        """Phase 3: the clients still online reveal the shares the server needs; then forget the session."""
        _, clients = self._protocol(protocol_id)
        self._session.pop(protocol_id)
        self._session_keys = {}
        return [client.unmask(request) for c, client in clients.items() if c in request.survivors]

    def _masked_sum(
        self,
        protocol_id: int,
        dim: int,
        rows: Iterable[tuple[int, np.ndarray]],
        inbox: dict[int, dict],
        here: frozenset[int],
        quantize_stream: str,
        share: Callable | None,
    ) -> np.ndarray:
        """Phase 2 for some clients: quantize each client's vector (with its distributed-DP noise
        share, `share(n, step, rng)`, when that gives one), mask it, return the sum mod 2^b. Pair masks between two clients
        both summed here (`here`) cancel in this worker's sum, so they are never expanded."""
        p, clients = self._protocol(protocol_id)
        total = np.zeros(dim, dtype=np.uint64)
        for c, v in rows:
            key = self._session_keys[int(c)]
            q = quantize(v, p.clip, p.step, p.bits, key.uniform(len(v), quantize_stream, protocol_id, c))
            noise = share(len(q), p.step, key.np_rng("dp-noise-share", protocol_id, c)) if share else None
            if noise is not None:
                # this client's Skellam share, in quantization steps, before masking, so the sum the
                # aggregator unmasks is already private (two's complement into Z_2^b)
                q = add_mod(q, noise.astype(np.uint64) & np.uint64((1 << p.bits) - 1), p.bits)
            total += clients[c].masked_input(q, inbox.get(c, {}), cancels=here).y  # uint64 wraps mod 2^64
        total &= np.uint64((1 << p.bits) - 1)  # then mod 2^b, once
        return total

    def secure_metric(
        self,
        protocol_id: int,
        global_params: np.ndarray,
        cids: Sequence[int],
        inbox: dict,
        rounds_done: int,
        stat: str = "accuracy",
        weight: float | None = None,
        noise: float | None = None,
        panel: int | None = None,
    ) -> MaskedUpdate:
        """Each evaluated individual's [values of METRIC_KEYS[stat]..., 1], quantized and masked;
        the sum over this worker's clients leaves (pair masks between them cancel), mod 2^b.
        Distributed DP: each adds its share of the release's noise (`noise`, over the `panel`)."""
        keys = METRIC_KEYS[stat]
        res = self._panel_values(global_params, cids, rounds_done, stat, weight)
        values = np.stack([res[k] for k in keys], axis=1)
        rows = [
            (
                c,
                np.append(v, 1.0) if np.isfinite(v).all() else np.zeros(len(keys) + 1),
            )  # no test data: nothing
            for c, v in zip(res["client_ids"], values)
        ]
        here = frozenset(int(c) for c in cids)
        share = (
            (lambda n, step, rng: self.dp.metric_share(n, step, noise, panel or len(cids), rng))
            if panel is not None
            else None
        )
        total = self._masked_sum(protocol_id, len(keys) + 1, rows, inbox, here, "metric-quantize", share)
        return MaskedUpdate(protocol_id, self.worker_id, total, tuple(int(c) for c in cids))
