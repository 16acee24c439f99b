"""A SecAgg+ client's side of one round (protocol.py describes the protocol): advertise two
keys, share its mask seeds with its neighbours, send its masked input, and answer the unmask
request with exactly one share per neighbour."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet

import numpy as np

from fedmeta.actors.secagg import shamir
from fedmeta.actors.secagg.keys import (
    KEY_BYTES,
    ShareDecryptionError,
    decrypt_share,
    draw_private_bytes,
    encrypt_share,
    keypair_from_bytes,
    pair_info,
    shared_seed,
)
from fedmeta.actors.secagg.masking import mask_vector
from fedmeta.actors.secagg.messages import (
    _SHARE_BYTES,
    MASK_PURPOSE,
    SHARE_PURPOSE,
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    ProtocolViolation,
    SecAggAbort,
    UnmaskRequest,
    UnmaskShares,
    _check_bits_arg,
    _check_id,
    _share_ad,
    _share_nonce,
)

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

    def share_keys(
        self, neighbour_keys: Mapping[int, tuple[bytes, bytes]], pair_keys: dict[bytes, bytes] | None = None
    ) -> EncryptedShares:
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

    def masked_input(
        self, q: np.ndarray, inbox: Mapping[int, bytes], cancels: AbstractSet[int] = frozenset()
    ) -> MaskedInput:
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
            raise ProtocolViolation(
                f"client {self.client_id} got ciphertexts from non-neighbours {sorted(unknown)}"
            )
        if len(inbox) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: only {len(inbox)} neighbours shared keys, fewer than "
                f"threshold t={self.threshold}"
            )
        self._inbox = {int(j): bytes(ct) for j, ct in inbox.items()}
        masked_with = [j for j in self._inbox if j not in cancels]
        seeds = {  # the seeds of cancelled pairs are never needed, so never agreed on
            j: shared_seed(
                self._s_sk,
                self._neighbour_keys[j][1],
                pair_info(MASK_PURPOSE, self.round_id, self.client_id, j),
            )
            for j in masked_with
        }
        y = mask_vector(q, self._self_seed, self.client_id, masked_with, seeds, self.bits)
        y.flags.writeable = False
        self._phase = "masked"
        return MaskedInput(self.client_id, y)

    def _decrypt(self, j: int) -> tuple[bytes, bytes]:
        """(share of b_j, share of s_j^SK) addressed to this client; ShareDecryptionError if tampered."""
        plain = decrypt_share(
            self._share_keys[j], self._inbox[j], _share_ad(self.round_id, j, self.client_id), _share_nonce(j)
        )
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
            raise ProtocolViolation(
                f"client {self.client_id}: clients {sorted(both)} listed as surviving and dropped"
            )
        if self.client_id not in survivors:
            raise ProtocolViolation(
                f"client {self.client_id} sent its masked input but is not listed as a survivor"
            )
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
