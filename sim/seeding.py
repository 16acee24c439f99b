"""Explicit, hierarchical randomness.

Every sampler in fedmeta takes a generator derived from (experiment seed, *keys), e.g.
(seed, "client", client_id) for a client's data. No code path touches a global RNG. Public
randomness (data, model init, batches) is a pure function of the config and seed, so any client's
data can be regenerated on demand, on any worker, in any order. What must stay secret (who is in
each round's cohort, keys, masks, noise) comes from `Secrets`, the run's own secret streams.
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
    """Where secret randomness comes from: who is sampled into each round under DP (cohorts,
    dropout, availability, the audit's canary coins; `Federation.membership`), clients' protocol keys, mask seeds and Shamir
    coefficients, their stochastic rounding and noise shares, local DP-SGD noise, and the server's
    central noise. Public randomness (batches, data, model init) stays a function of the seed.
    Privacy amplification by subsampling needs the first: whoever could recompute the cohorts
    (from the seed in the model card) would know every user's rounds.

    By default every stream is ChaCha20 (20 rounds, `randomgen`), keyed per stream by
    HMAC-SHA256(run secret, stream name and ids): a cryptographic generator whose outputs reveal
    neither the key nor other streams. The 32-byte run secret comes from the OS (`secrets`) and is
    kept by the driver (run_secret.key in the per-user state directory, sim/artifacts/statedir.py) so a resumed run continues the same
    streams and cohorts; the aggregator only ever gets `derive("aggregator")`, and a worker only its
    clients' keys of the round at hand (`client_keys`), from which neither the run secret nor any
    other party's key follows (HMAC is a PRF). Opacus' `secure_mode` is the model.

    `Secrets.seeded(seed)` (config `run.seeded_secrets: true`) makes every secret stream the
    seed's `np_rng(seed, *keys)` instead: bit-exact runs for tests and debugging, private only
    against parties that do not know the seed."""

    def __init__(self, key: bytes | None, seed: int, prefix: tuple = ()):
        # prefix: seeded streams of one party of several that share a seed (a Tune trial)
        self.key, self.seed, self.prefix = key, seed, tuple(prefix)

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
        return Secrets(None if self.key is None else self._stream_key(*keys), self.seed, self.prefix)

    def for_trial(self, trial: str) -> Secrets:
        """A Tune trial's own secrets: its cohorts, keys and noise independent of every other
        trial's (so the trials' rounds compose as independent subsampled releases). Seeded: the
        seed's streams under the trial's name, still reproducible."""
        if self.key is None:
            return Secrets(None, self.seed, (*self.prefix, "trial", trial))
        return Secrets(self._stream_key("trial", trial), self.seed)

    def _stream_key(self, *keys: int | str) -> bytes:
        import hashlib
        import hmac

        return hmac.new(self.key, "/".join(str(k) for k in keys).encode(), hashlib.sha256).digest()

    def np_rng(self, *keys: int | str) -> np.random.Generator:
        if self.key is None:
            return np_rng(self.seed, *self.prefix, *keys)
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
            return np_rng(self.seed, *self.prefix, *keys).random(n)
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key = self._stream_key("uniform", *keys)  # its own key: never the Generator stream's
        stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
        return (np.frombuffer(stream, dtype="<u8") >> np.uint64(11)) * 2.0**-53

    def noise(self, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator | SecureGaussian:
        """The source of the DP noise named by `keys`, for `gaussian_noise`: a `SecureGaussian` on this
        stream's own key, or with seeded secrets the seed's torch generator (bit-exact replays, as before)."""
        if self.key is None:
            return torch_gen(self.seed, *self.prefix, *keys, device=device)
        return SecureGaussian(self._stream_key("gaussian", *keys))

    def torch_gen(self, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch generator for secret noise. Torch's generators are not cryptographic, so in the
        default mode its 63-bit seed is drawn from the secret stream: what the noise hides cannot be
        recomputed from anything public."""
        if self.key is None:
            return torch_gen(self.seed, *self.prefix, *keys, device=device)
        g = torch.Generator(device=device)
        g.manual_seed(int(self.np_rng(*keys).integers(2**63)))
        return g


def client_keys(secrets: Secrets, scope: int, cids) -> dict[int, Secrets]:
    """What the worker hosting clients `cids` gets for one protocol or training round `scope`: each
    client's own key for that round, HMAC(run secret, "client", scope, id). From it follow the
    client's streams of that round and nothing else: not the run secret, not the aggregator's key,
    not another client's or another round's keys (HMAC is a PRF). Seeded secrets stay the seed's."""
    return {int(c): secrets.derive("client", scope, int(c)) for c in cids}


class SecureGaussian:
    """Gaussian noise that is safe against floating-point attacks (Mironov 2012), from a CSPRNG.

    The uniforms are the 53 high bits of 64-bit words of one ChaCha20 keystream (`cryptography`,
    OpenSSL's cipher) under this source's key; successive draws continue the stream. Box-Muller in
    float64 turns each pair into two normals, and every sample is the sum of four of them divided by
    two: Holohan & Braghin 2021 ("Secure random sampling in differential privacy"), the construction
    of Opacus' `secure_mode`, whose sum hides the low bits that single floating-point draws leak."""

    NAME = "chacha20-gaussian-sum4"

    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _uniform(self, n: int) -> np.ndarray:
        words = np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")
        return (words >> np.uint64(11)) * 2.0**-53

    def standard(self, n: int) -> np.ndarray:
        """n i.i.d. N(0, 1) samples (float64)."""
        m = 4 * n + (4 * n) % 2
        u = self._uniform(m)
        r = np.sqrt(-2.0 * np.log1p(-u[0::2]))  # 1 - u in (0, 1]: log is finite
        z = np.concatenate([r * np.cos(2 * np.pi * u[1::2]), r * np.sin(2 * np.pi * u[1::2])])
        return z[: 4 * n].reshape(4, n).sum(0) / 2.0

    def normal(
        self, shape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        shape = tuple(shape)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return torch.from_numpy(self.standard(n).reshape(shape)).to(dtype=dtype, device=device)


def gaussian_noise(
    shape,
    source: torch.Generator | SecureGaussian,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """N(0, 1) noise of `shape` from `source` (a `Secrets.noise` source)."""
    if isinstance(source, SecureGaussian):
        return source.normal(shape, dtype, device)
    return torch.randn(tuple(shape), generator=source, dtype=dtype, device=device)


def noise_sampler(seeded: bool) -> str:
    """What the summary names as the DP noise sampler."""
    return (
        "torch.randn from the seed (run.seeded_secrets: not attack-safe)" if seeded else SecureGaussian.NAME
    )
