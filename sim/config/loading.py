"""Loading an experiment: YAML files and presets, `--set` overrides, and one-line `ConfigError`s.

`load` reads a config file or a built-in preset (configs/*.yaml, found next to the checkout or as
the package data of `fedmeta.configs`), applies `key.path=value` overrides, anchors relative paths
to the file's folder and validates it with `from_dict`, which turns pydantic's errors into one
message naming the key path. Values no field can take (integers beyond int64, non-string keys) and
hostile documents (oversized files, alias bombs, deep nesting) are refused before pydantic sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedmeta.sim.config.base import SHORT, ConfigError
from fedmeta.sim.config.experiment import ExperimentConfig


def _describe(err: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    loc = ".".join(str(p) for p in (*prefix, *err["loc"]))
    msg = err["msg"]
    if err["type"] == "value_error":
        # our validators start their message with the key path relative to the section they check
        msg = msg.removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            return f"{loc + '.' if loc else ''}{head}: {rest}"
        return f"{loc or '<root>'}: {msg}"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    got = err.get("input")
    # reprlib: a hostile value (YAML aliases nest a list 9^9 deep cheaply) is shown in bounded time
    shown = SHORT.repr(got) if not isinstance(got, dict) else "a mapping"
    return f"{loc}: {msg} (got {shown})"


INT64 = 2**63 - 1
MAX_CONFIG_BYTES = 1 << 20


def _check_plain(node: Any, path: tuple = (), seen: set | None = None) -> None:
    """Values no field can take, named by their key path before pydantic sees them: integers beyond
    int64 (numpy, torch and Ray would fail later with a traceback) and non-string keys. Shared
    subtrees (YAML aliases) are checked once, so an alias bomb costs its size on disk, not 9^9."""
    seen = set() if seen is None else seen
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            return
        seen.add(id(node))
    where = ".".join(map(str, path)) or "<root>"
    if isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT64:
        raise ConfigError(f"{where}: {SHORT.repr(node)} is out of range (at most {INT64:,} in magnitude)")
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: keys are names, got the {type(k).__name__} {SHORT.repr(k)}")
            _check_plain(v, (*path, k), seen)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_plain(v, (*path, i), seen)


def from_dict(raw: Any, source: str = "config") -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )
    try:
        _check_plain(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()
        first = _describe(errs[0])
        more = f" (and {len(errs) - 1} more error(s))" if len(errs) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` strings; values are parsed as YAML scalars (3 -> int, null -> None)."""
    out = []
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            out.append((key.strip(), yaml.safe_load(val)))
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"--set {key}: value {val!r} is not valid YAML") from None
    return out


def read_yaml(p: Path, missing: str) -> Any:
    """The YAML document in file `p`; a one-line ConfigError when it is not there (`missing` says
    what it should have been) or is not valid YAML (where)."""
    if not p.is_file():
        raise ConfigError(f"{p}: {missing}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{p}: {p.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} (is this the "
            f"right file?)"
        )
    try:
        return yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None


def load_raw(path: str | Path) -> dict:
    raw = read_yaml(Path(path), f"config file not found (nor a preset: {', '.join(presets())})")
    return raw if raw is not None else {}


def config_path(path: str | Path | None) -> Path:
    """A config file, or the name of a built-in preset (`quickstart`, `table`, `bench_w1`, ...): a path
    that exists wins; otherwise a preset of that name; None is the quickstart."""
    if path is None:
        return default_config_path()
    p = Path(path)
    if p.is_file() or p.suffix or len(p.parts) > 1:
        return p
    preset = default_config_path(f"{p.name}.yaml")
    return preset if preset.is_file() else p


def presets() -> list[str]:
    return sorted(Path(str(f)).stem for f in default_config_path().parent.glob("*.yaml"))


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment (a path or a preset name; default: the built-in quickstart) with
    optional `key=value` overrides."""
    src = config_path(path)
    raw = load_raw(src)
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a mapping of sections at the top level")
    for key, val in parse_overrides(overrides or []):
        _set_path(raw, key, val)
    if src.resolve().parent != default_config_path().resolve().parent:
        _anchor_to_folder(raw, src.resolve().parent)
    return from_dict(raw, source=str(src))


DATA_PATHS = (("data", "table", "path"), ("data", "femnist", "path"))


def _anchor_to_folder(raw: dict, folder: Path) -> None:
    """A config file's folder is where its own code and data are found too: the folder joins
    `run.code_paths`, and a relative data path missing from the working directory but present next
    to the file becomes that absolute path (so the saved config resumes from anywhere)."""
    run = raw.setdefault("run", {})
    if isinstance(run, dict):
        paths = run.setdefault("code_paths", [])
        if isinstance(paths, list) and str(folder) not in paths:
            paths.append(str(folder))
    for keys in DATA_PATHS:
        node: Any = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if (
            isinstance(value, str)
            and not Path(value).is_absolute()
            and not Path(value).exists()
            and (folder / value).exists()
        ):
            node[keys[-1]] = str(folder / value)


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with its relative data paths made absolute against this process's working
    directory, so actors started elsewhere (another folder, another node) read the same files."""
    data = cfg.data
    for name in ("table", "femnist"):
        section = getattr(data, name)
        if section.path and not Path(section.path).is_absolute():
            section = section.model_copy(update={"path": str(Path(section.path).resolve())})
            data = data.model_copy(update={name: section})
    return cfg if data is cfg.data else cfg.model_copy(update={"data": data})


def default_config_path(name: str = "quickstart.yaml") -> Path:
    """configs/<name> (default: the quickstart): the checkout's folder, or in an installed wheel the
    package data of `fedmeta.configs`, found with importlib.resources."""
    here = Path(__file__).resolve().parents[2] / "configs" / name  # sim/config/loading.py -> root
    if here.is_file():
        return here
    from importlib.resources import files

    return Path(str(files("fedmeta.configs") / name))


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
