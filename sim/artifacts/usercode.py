"""Importing the researcher's own code named in a config (`package.module:name`), and the rule
for artifacts: a config or model card read from a run directory, a member checkpoint or a Tune
experiment is data. What it names as code (a custom model's `model.target`, a custom algorithm's
`algorithm.name`) is imported only when the user says so for that load (`--trust-code`,
`trust_code=True`), and then only from the user's own paths (the working directory and PYTHONPATH),
never from folders the artifact lists (`run.code_paths`)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from fedmeta.sim.config import ConfigError


def add_code_path(paths) -> None:
    """Make the driver's folders importable here (an actor process on the same machine)."""
    for p in paths:
        if p not in sys.path:
            sys.path.append(p)


def code_paths(cfg) -> list[str]:
    """The folders user code is imported from: the working directory, then `run.code_paths` (which
    holds the config file's folder when the config was loaded from a file)."""
    return [os.getcwd(), *cfg.run.code_paths]


def import_target(target: str, key: str):
    """The object `package.module:name`, from PYTHONPATH or the working directory; a ConfigError
    naming `key` when it cannot be imported."""
    module, _, name = target.partition(":")
    add_code_path([str(Path.cwd())])
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {target!r} ({e})") from None


TRUST_FLAG = "--trust-code"


def named_code(
    model_kind: str, model_target: str | None, algorithm: str | None = None
) -> list[tuple[str, str]]:
    """(key, target) for each entry that names code to import: what loading it would run."""
    named = []
    if model_kind == "custom":
        named.append(("model.target", str(model_target)))
    if algorithm is not None and ":" in algorithm:
        named.append(("algorithm.name", algorithm))
    return named


def refuse_code(named: list[tuple[str, str]], source: str, trust_code: bool) -> None:
    """A ConfigError naming the first entry and the flag, unless the user trusts the artifact."""
    if named and not trust_code:
        key, target = named[0]
        raise ConfigError(
            f"{source}: {key} names code ({target!r}) that loading it would import and run; "
            f"pass {TRUST_FLAG} (trust_code=True) if you trust it"
        )


def artifact_config(cfg, source: str, trust_code: bool = False):
    """A config read from an artifact, as data: refused when it names code and the user did not
    trust it; its `run.code_paths` dropped (the artifact never adds where code is imported from)."""
    refuse_code(named_code(cfg.model.kind, cfg.model.target, cfg.algorithm.name), source, trust_code)
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"code_paths": []})})
