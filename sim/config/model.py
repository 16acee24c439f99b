"""The `model` and `algorithm` sections: the network every client trains and how it is trained.

`ModelConfig` picks a built-in MLP or CNN (or a `custom` factory importable as
'package.module:factory'); `AlgorithmConfig` names a built-in federated algorithm
(`BUILTIN_ALGORITHMS`) or your own subclass of `fedmeta.Algorithm`, with the local and server
optimisation settings they share.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedmeta.sim.config.base import Section


class ModelConfig(Section):
    kind: Literal["mlp", "cnn", "custom"] = "mlp"
    target: str | None = Field(
        None,
        description="custom: 'package.module:factory', factory(input_shape, num_classes, "
        "**kwargs) -> nn.Module, importable from the working directory or "
        "PYTHONPATH",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="custom: keyword arguments of the factory"
    )
    hidden: list[int] = Field(default_factory=lambda: [128], description="MLP hidden widths")
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1, description="CNN conv widths")
    kernel_size: int = Field(5, ge=1)
    padding: int = Field(0, ge=0)
    cnn_hidden: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _custom_needs_target(self) -> "ModelConfig":
        if self.kind == "custom" and not (
            self.target and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.target)
        ):
            raise ValueError(f"target: kind 'custom' needs 'package.module:factory', got {self.target!r}")
        if self.kind != "custom" and (self.target or self.kwargs):
            key = "target" if self.target else "kwargs"
            raise ValueError(f"{key}: only for kind 'custom' (kind is {self.kind!r})")
        return self


BUILTIN_ALGORITHMS = ("fedavg", "reptile", "fomaml", "fedprox", "fedadam", "fedyogi", "fedadagrad", "ditto")


class AlgorithmConfig(Section):
    name: str = Field(
        "fedavg",
        description="fedavg, reptile, fomaml, fedprox, fedadam, fedyogi, fedadagrad, ditto, "
        "or your "
        "own: 'package.module:Class' "
        "(a subclass of fedmeta.Algorithm, importable from the working "
        "directory or PYTHONPATH)",
    )
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="if set, overrides local_epochs")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.05, gt=0, description="client SGD learning rate (outer beta for fomaml)")
    inner_lr: float = Field(0.02, gt=0, description="fomaml inner (adaptation) learning rate alpha")
    server_lr: float = Field(1.0, gt=0, description="server step on the aggregated update")
    weighted: bool | None = Field(None, description="weight updates by train size; null = algorithm default")
    privacy_lambda: float = Field(
        0.0, ge=0, description="weight of the output-confidence privacy penalty in the local loss"
    )
    proximal_mu: float = Field(
        0.01, ge=0, description="fedprox: weight of the proximal term mu/2 ||w - w_global||^2"
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi/fedadagrad: server momentum")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: server second-moment decay")
    tau: float = Field(
        1e-3, gt=0, description="fedadam/fedyogi/fedadagrad: adaptivity (epsilon) of the server step"
    )
    ditto_lambda: float = Field(
        0.1,
        ge=0,
        description="ditto: pull lambda/2 ||v - w_global||^2 of each personalized "
        "model v towards the global model",
    )

    @field_validator("name")
    @classmethod
    def _known_or_importable(cls, name: str) -> str:
        if name in BUILTIN_ALGORITHMS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            return name
        raise ValueError(
            f"expected one of {', '.join(BUILTIN_ALGORITHMS)} or 'package.module:ClassName', got {name!r}"
        )
