"""The wheel ships every package of the checkout under the one import name `fedmeta`."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fedmeta"} | {
        "fedmeta." + ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("sim", "actors", "serve", "configs")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert listed == found, (
        f"pyproject.toml packages: missing {sorted(found - listed)}, stale {sorted(listed - found)}"
    )
