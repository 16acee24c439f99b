"""Parameters of secure aggregation for one experiment, derived once from its config.

Updates are L2-clipped to C (`privacy.clip_norm`, so every coordinate is within [-C, C]) and
quantized with step C / 2^quant_bits; the modulus 2^bits is the smallest for which the sum of a
full cohort cannot wrap (`quantize.check_no_overflow`). t defaults to k // 2 + 1: a strict majority
of each client's neighbours, the smallest threshold for which two disjoint groups of neighbours
cannot both reconstruct (Bonawitz et al. 2017, Sec. 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from actors.secagg.quantize import check_no_overflow


@dataclass(frozen=True)
class SecAggParams:
    neighbors: int | None   # k; None = complete graph
    threshold: int          # t
    clip: float             # C
    step: float             # quantization step
    bits: int               # modulus 2^bits
    noise_multiplier: float = 0.0   # distributed DP: z of the Skellam shares (0: none)
    cohort: int = 1                 # expected clients per round (each adds 1/cohort of the noise)


def secagg_params(neighbors: int | None, threshold: int | None, clip_norm: float, quant_bits: int,
                  cohort: int, noise_multiplier: float = 0.0) -> SecAggParams:
    if cohort < 2:
        raise ValueError(f"federation.clients_per_round: secure aggregation needs at least 2 clients, got {cohort}")
    degree = cohort - 1 if neighbors is None else min(neighbors, cohort - 1)
    t = threshold if threshold is not None else degree // 2 + 1
    if not 1 <= t <= degree:
        raise ValueError(f"secagg.threshold: must be in [1, {degree}] (the mask graph's degree), got {t}")
    step = clip_norm / 2 ** quant_bits
    # distributed noise: the summed Skellam noise has std z*C (in value units); leave room for a
    # 10-sigma tail, i.e. as much range as ceil(10 z) more clients at full clip
    headroom = math.ceil(10 * noise_multiplier)
    bits = check_no_overflow(cohort + headroom, clip_norm, step)
    return SecAggParams(neighbors, t, clip_norm, step, bits, noise_multiplier, cohort)
