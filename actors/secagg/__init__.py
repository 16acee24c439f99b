"""Pure building blocks of masked secure aggregation.

Implements the client- and server-side arithmetic of Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning" (CCS'17), with the sparse k-regular
neighbour graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS'20):

- `quantize`: clip + unbiased stochastic rounding into the ring Z_{2^b}, and the rule that picks b
  so that the sum of all clients' vectors cannot wrap around.
- `prg`: expansion of a 32-byte seed into a uniform mask vector in Z_{2^b} (ChaCha20).
- `keys`: X25519 key agreement + HKDF-SHA256 seeds, AES-GCM encryption of shares.
- `shamir`: t-of-n Shamir secret sharing over the Mersenne prime field GF(2^521 - 1).
- `graph`: Harary neighbour graphs (SecAgg+) and the complete graph (original SecAgg).
- `masking`: adding self and pairwise masks on a client; removing them from the sum on the server.
- `params`: the SecAgg+ parameter finder (Bell et al. 2020): k and t from the cohort size, dropout
  and adversarial fractions and the security/correctness targets.

Nothing here imports ray, reads files, or touches a global RNG: simulation randomness comes in as
a `numpy.random.Generator`, cryptographic randomness as explicit bytes.
"""
