"""MkDocs hook: lets mkdocstrings read the package `fedmeta` from source.

The repository root *is* the package `fedmeta` (pyproject maps `fedmeta = "."`), so no folder on
disk is named `fedmeta` and griffe, which finds packages by folder name, cannot find it statically
(it would fall back to importing and inspecting it, which loses the source's documentation). At
`on_config` this builds `build/api-src/fedmeta/` (build/ is ignored by git): a folder of symlinks
to the root's `__init__.py` and its packages (`sim`, `actors`, `serve`, `configs`), and
mkdocs.yml's python handler searches `build/api-src` (`paths:`). Tests, docs and notebooks are
not packages and are left out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "build" / "api-src" / "fedmeta"


def build_source_tree() -> Path:
    if SOURCE.exists() or SOURCE.is_symlink():
        shutil.rmtree(SOURCE)
    SOURCE.mkdir(parents=True)
    for entry in sorted(ROOT.iterdir()):
        if entry.name == "__init__.py" or (entry.is_dir() and (entry / "__init__.py").is_file()):
            (SOURCE / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return SOURCE.parent


def on_config(config):
    build_source_tree()
    return config
