"""Explicit, hierarchical randomness.

Every sampler in fedmeta takes a generator derived from (experiment seed, *keys), e.g.
(seed, "cohort", round) or (seed, "client", client_id). No code path touches a global RNG, so
a run is a pure function of its config and seed, and any client's data or any round's cohort can be
regenerated on demand, on any worker, in any order.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(k: int | str) -> int:
    if isinstance(k, str):
        # crc32 is stable across processes (unlike hash()), so workers agree on streams.
        return zlib.crc32(k.encode())
    if k < 0:
        raise ValueError(f"seed keys must be non-negative, got {k}")
    return int(k)


def seed_sequence(seed: int, *keys: int | str) -> np.random.SeedSequence:
    return np.random.SeedSequence([_key(seed), *(_key(k) for k in keys)])


def np_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy Generator for the stream named by (seed, *keys)."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def torch_gen(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator for the stream named by (seed, *keys)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed_sequence(seed, *keys).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


class Secrets:
    """Where secret randomness comes from: clients' protocol keys, mask seeds and Shamir
    coefficients, their stochastic rounding and noise shares, local DP-SGD noise, and the server's
    central noise. Public randomness (cohorts, batches, data) stays a function of the seed.

    By default every stream is ChaCha20 (20 rounds, `randomgen`), keyed per stream by
    HMAC-SHA256(run secret, stream name and ids): a cryptographic generator whose outputs reveal
    neither the key nor other streams. The 32-byte run secret comes from the OS (`secrets`) and is
    kept by the driver (run_secret.key in the run directory) so a resumed run continues the same
    streams; the aggregator only ever gets `derive("aggregator")`, from which no client's secret
    follows (HMAC is a PRF). Opacus' `secure_mode` is the model.

    `Secrets.seeded(seed)` (config `run.seeded_secrets: true`) makes every secret stream the
    seed's `np_rng(seed, *keys)` instead: bit-exact runs for tests and debugging, private only
    against parties that do not know the seed."""

    def __init__(self, key: bytes | None, seed: int):
        self.key, self.seed = key, seed

    @classmethod
    def fresh(cls, seed: int) -> Secrets:
        import secrets

        return cls(secrets.token_bytes(32), seed)

    @classmethod
    def seeded(cls, seed: int) -> Secrets:
        return cls(None, seed)

    @property
    def is_seeded(self) -> bool:
        return self.key is None

    def derive(self, *keys: int | str) -> Secrets:
        """The secrets of one party (e.g. the aggregator): its own key, independent of the others'."""
        return Secrets(None if self.key is None else self._stream_key(*keys), self.seed)

    def _stream_key(self, *keys: int | str) -> bytes:
        import hashlib
        import hmac

        return hmac.new(self.key, "/".join(str(k) for k in keys).encode(), hashlib.sha256).digest()

    def np_rng(self, *keys: int | str) -> np.random.Generator:
        if self.key is None:
            return np_rng(self.seed, *keys)
        from randomgen import ChaCha

        key = int.from_bytes(self._stream_key(*keys), "little")
        return np.random.Generator(ChaCha(key=key, counter=0, rounds=20))

    def uniform(self, n: int, *keys: int | str) -> np.ndarray:
        """n uniforms in [0, 1) (float64) from the stream named by `keys`: e.g. a client's stochastic
        rounding coins. Seeded: `np_rng(seed, *keys).random(n)`, as before. Secret: the 53 high bits of
        each 64-bit word of the ChaCha20 keystream (`cryptography`, OpenSSL's vectorized cipher) under
        the stream's own key, ~10x faster than drawing them through a `randomgen` Generator; the
        coins of a k = 20 secure W1 round were the largest share of its overhead (issue 16)."""
        if self.key is None:
            return np_rng(self.seed, *keys).random(n)
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key = self._stream_key("uniform", *keys)     # its own key: never the Generator stream's
        stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
        return (np.frombuffer(stream, dtype="<u8") >> np.uint64(11)) * 2.0 ** -53

    def torch_gen(self, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch generator for secret noise. Torch's generators are not cryptographic, so in the
        default mode its 63-bit seed is drawn from the secret stream: what the noise hides cannot be
        recomputed from anything public."""
        if self.key is None:
            return torch_gen(self.seed, *keys, device=device)
        g = torch.Generator(device=device)
        g.manual_seed(int(self.np_rng(*keys).integers(2**63)))
        return g
