"""Importing the researcher's own code named in a config (`package.module:name`)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from sim.config import ConfigError


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
