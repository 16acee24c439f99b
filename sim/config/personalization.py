"""The `personalization` and `profiles` sections: `fedmeta table` and the consent gate.

`PersonalizationConfig` is the Table I experiment (one model per individual and method, each row a
`MethodSpec`: shaping or data grouping); `ProfilesConfig` is the encrypted user profile store
whose 'personalization' consent decides which clients train.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmeta.sim.config.base import Section


class MethodSpec(Section):
    """One row of the personalization table (Schneider & Vlachos, Table I)."""

    method: Literal["baseline", "es", "sw", "tl", "random", "sg", "ig"] = Field(
        description="shaping: baseline, es, sw, tl; grouping: random (the grouping baseline), sg, ig"
    )
    n: float | None = Field(
        None,
        gt=0,
        description="es/tl: batches on D_I; sw: periodicity n_I (may be < 1); "
        "random/sg: samples added; ig: individuals added",
    )
    last_layers: int | None = Field(None, ge=1, description="tl: adapt only the last k layers")

    @model_validator(mode="after")
    def _n_fits_method(self) -> "MethodSpec":
        if self.method == "baseline":
            if self.n is not None:
                raise ValueError("n: the shaping baseline takes no n")
        elif self.n is None:
            raise ValueError(f"n: required for method '{self.method}'")
        elif self.method != "sw" and self.n != int(self.n):
            raise ValueError(f"n: must be a whole number for method '{self.method}', got {self.n}")
        if self.last_layers is not None and self.method != "tl":
            raise ValueError("last_layers: only for method 'tl'")
        return self

    @property
    def group(self) -> str:
        return "shaping" if self.method in ("baseline", "es", "sw", "tl") else "grouping"

    @property
    def label(self) -> str:
        names = {
            "baseline": "BaseLine",
            "es": "EarlyShape-ES",
            "sw": "SampleWeigh-SW",
            "tl": "TransferL-TL",
            "random": "BaseLine",
            "sg": "SingleSa.Group-SG",
            "ig": "IndividualGroup-IG",
        }
        if self.n is None:
            return names[self.method]
        n = int(self.n) if self.n == int(self.n) else self.n
        tail = f"-last-{self.last_layers}" if self.last_layers else ""
        return f"{names[self.method]}-n-{n}{tail}"


def _table_i_methods() -> list[MethodSpec]:
    rows = [
        ("baseline", None),
        ("es", 40),
        ("es", 400),
        ("sw", 12),
        ("sw", 2),
        ("tl", 10),
        ("tl", 300),
        ("random", 1500),
        ("random", 6500),
        ("ig", 5),
        ("ig", 21),
        ("sg", 1500),
        ("sg", 6500),
    ]
    return [MethodSpec(method=m, n=n) for m, n in rows]


class PersonalizationConfig(Section):
    """`fedmeta table`: one model per individual and method, trained on D_G (the server's data) and
    the individual's D_I (its device), evaluated on D_I's test split and on held-out D_G."""

    individuals: int = Field(30, ge=2, description="evaluated individuals (from the federation)")
    global_test_fraction: float = Field(0.2, gt=0, lt=1, description="share of D_G held out for acc(D_G)")
    epochs: int = Field(5, ge=1, description="passes over D_G")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, description="SGD learning rate of every method")
    grouping_periodicity: float = Field(
        2.0, gt=0, description="SW n_I with which grouping methods mix in D_I'"
    )
    latent_dim: int = Field(16, ge=1, description="auto-encoder code size")
    ae_epochs: int = Field(20, ge=1)
    ae_lr: float = Field(1e-3, gt=0, description="auto-encoder Adam learning rate")
    ig_pool: int = Field(
        300,
        ge=2,
        description="federation individuals whose class-mean latents enter the "
        "profile store as IG candidates",
    )
    consent_rate: float = Field(1.0, ge=0, le=1, description="share of the pool consenting to 'grouping'")
    methods: list[MethodSpec] = Field(default_factory=_table_i_methods, min_length=1)


class ProfilesConfig(Section):
    """The encrypted user profile store (actors/profile_store/) as the federation's consent gate:
    every client is a registered user; only those consenting to 'personalization' train."""

    enabled: bool = False
    path: str | None = Field(
        None,
        description="SQLite file; null = profiles.sqlite in the run directory "
        "(its master key in the per-user state directory, "
        "$FEDMETA_STATE_DIR, never next to it)",
    )
    consent_rate: float = Field(
        1.0, ge=0, le=1, description="share of users granting 'personalization' at sign-up"
    )
