"""Scaling studies (`fedmeta study STUDY.yaml`): one experiment over a grid of config values.

A study file names a base experiment, overrides for every cell (`set:`), the grid (`grid:`, dotted
key -> values) and `repeats:` (seeds per cell). The grid runs as Ray Tune's grid search: one trial
per cell and seed, each trial one full run of the experiment (`run_experiment`) on its own actor
pool inside the trial's placement group, reporting the run's summary.json values.

    <out_dir>/<name>/       the study directory (name: the study's `name:`, else the file's stem)
      study.yaml            the study as run (base resolved); a rerun or --resume must match it
      trials/               the Tune experiment (restorable with tune.Tuner.restore)
      runs/<cell>/          each trial's run directory
      study.parquet, study.csv, *.png

Running a study whose directory already holds its Tune experiment restores it
(`Tuner.restore(..., resume_errored=True)`): finished cells are kept, the others run; a run that
stopped midway continues from its own checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import tune

from fedmeta.sim.config import (
    ConfigError,
    ExperimentConfig,
    config_path,
    from_dict,
    load,
    load_raw,
    presets,
    read_yaml,
    with_absolute_paths,
)
from fedmeta.sim.engine.cluster import init_ray
from fedmeta.sim.tuning.autotune import run_experiment
from fedmeta.sim.tuning.study_plots import ID_COLUMNS, METRICS, plot_study
from fedmeta.sim.tuning.trial import check_fits

TRIALS = "trials"  # the Tune experiment's folder inside the study directory
SPEC_FILE = "study.yaml"
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
SCALARS = (bool, int, float, str, type(None))


class StudySpec(BaseModel):
    """The study file (strict: unknown keys and wrong types are errors)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    base: str = Field(
        min_length=1,
        description="a preset name (quickstart) or an experiment YAML; a relative "
        "path is read from the study file's folder",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, alias="set", description="dotted key -> value, applied to every cell"
    )
    grid: dict[str, Any] = Field(description="dotted key -> list of values; the cells are every combination")
    repeats: int = Field(1, ge=1, description="seeds per cell: base seed + 0 .. repeats-1")
    name: str | None = Field(None, pattern=r"^[\w.-]+$", description="the study directory's name")
    out_dir: str = Field("studies", min_length=1, description="where the study directory goes")

    @field_validator("overrides")
    @classmethod
    def _dotted_keys(cls, value: dict) -> dict:
        for key in value:
            _check_key(key)
        return value

    @field_validator("grid")
    @classmethod
    def _lists_of_scalars(cls, value: dict) -> dict:
        if not value:
            raise ValueError("expected at least one dotted key with a list of values")
        for key, values in value.items():
            _check_key(key)
            if key == "seed":
                raise ValueError("seed: the seeds come from repeats: (base seed + 0 .. repeats-1)")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{key}: expected a non-empty list (got {values!r})")
            if not all(isinstance(v, SCALARS) for v in values):
                raise ValueError(f"{key}: values must be numbers, strings, booleans or null (got {values!r})")
            if len({json.dumps(v) for v in values}) < len(values):
                raise ValueError(f"{key}: a value repeats (got {values!r})")
        return value

    @model_validator(mode="after")
    def _grid_or_set(self) -> "StudySpec":
        for key in self.grid:
            if key in self.overrides:
                raise ValueError(f"grid.{key}: also in set:; a key is either fixed or varied")
        return self


def _check_key(key: str) -> None:
    if not KEY.fullmatch(key):
        raise ValueError(f"{key!r}: not a dotted key path (e.g. federation.clients_per_round)")


@dataclass(frozen=True)
class Study:
    """A validated study: every cell's experiment config, checked before anything runs."""

    path: Path
    spec: StudySpec
    base: str  # the resolved base: a preset name or an absolute path
    cells: list[dict]  # grid values and seed per trial, in the grid's order
    configs: list[ExperimentConfig]

    @property
    def keys(self) -> list[str]:
        return list(self.spec.grid)

    @property
    def directory(self) -> Path:
        return Path(self.spec.out_dir) / (self.spec.name or self.path.stem)

    def record(self) -> dict:
        """What study.yaml holds: the study with its base resolved (what a rerun is compared with)."""
        return {
            "name": self.spec.name or self.path.stem,
            "source": str(self.path.resolve()),
            "base": self.base,
            "set": self.spec.overrides,
            "grid": self.spec.grid,
            "repeats": self.spec.repeats,
        }

    def raw_configs(self) -> dict[str, dict]:
        """cell id -> the cell's full experiment config, what each trial runs."""
        return {cell_id(c): cfg.model_dump(mode="json") for c, cfg in zip(self.cells, self.configs)}


class StudyIncomplete(RuntimeError):
    """Some cells did not finish (a failed trial or Ctrl-C); the finished ones are in the table."""

    def __init__(self, message: str, directory: Path, interrupted: bool):
        super().__init__(message)
        self.directory, self.interrupted = directory, interrupted


# ---------------------------------------------------------------- the study file
def load_study(path: str | Path) -> Study:
    """Read and validate a study file and every cell's experiment config (ConfigError: one line
    naming the study key)."""
    path = Path(path)
    spec = _parse_spec(path)
    base = _resolve_base(spec.base, path)
    seed = spec.overrides.get("seed", _base_seed(base, path))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{path}: set.seed: expected an integer (got {seed!r})")
    values = [[(k, v) for v in vs] for k, vs in spec.grid.items()]
    cells = [
        {**dict(combo), "seed": seed + i} for combo in itertools.product(*values) for i in range(spec.repeats)
    ]
    configs = [_cell_config(path, spec, base, cell) for cell in cells]
    return Study(path, spec, str(base), cells, configs)


def _parse_spec(path: Path) -> StudySpec:
    raw = read_yaml(path, "study file not found")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base, set, grid (and repeats, name, out_dir)")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()
        more = f" (and {len(errs) - 1} more error(s))" if len(errs) > 1 else ""
        raise ConfigError(f"{path}: {_describe(errs[0])}{more}") from None


def _describe(err: dict) -> str:
    """One pydantic error as `key.path: what was expected`."""
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        # our validators start their message with the dotted key they reject, below the field
        head, sep, rest = msg.partition(": ")
        if loc and sep and " " not in head:
            return f"{loc}.{head}: {rest}"
        return f"{loc}: {msg}" if loc else msg
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (a study has base, set, grid, repeats, name, out_dir)"
    if err["type"] == "missing":
        return f"{loc}: required"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def _resolve_base(base: str, study: Path) -> Path:
    """A relative path is read from the study file's folder; a bare name may be a preset."""
    p = Path(base).expanduser()
    here = p if p.is_absolute() else study.resolve().parent / p
    if here.is_file():
        return here
    preset = config_path(base)
    if preset.is_file() and not p.suffix and len(p.parts) == 1:
        return preset
    raise ConfigError(f"{study}: base: no experiment file {here} (nor a preset: {', '.join(presets())})")


def _base_seed(base: Path, study: Path) -> Any:
    """The base experiment's seed (the cells' seeds count from it), read before any validation:
    the base alone need not be valid, only each cell (base + set + grid values)."""
    try:
        raw = load_raw(base)
    except ConfigError as e:
        raise ConfigError(f"{study}: base: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{study}: base: {base}: expected a mapping of sections")
    return raw.get("seed", ExperimentConfig.model_fields["seed"].default)


def _cell_config(path: Path, spec: StudySpec, base: Path, cell: dict) -> ExperimentConfig:
    """The cell's experiment config: the base loaded as `fedmeta run` loads it (its folder joins
    run.code_paths, data paths next to it are found) with `set:` and the cell's values as overrides
    (JSON, which the overrides' YAML parser reads back exactly). An error names the study key it
    comes from and the cell."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**spec.overrides, **cell}.items()]
    try:
        cfg = load(base, overrides)
    except ConfigError as e:
        msg = str(e).removeprefix(f"{base}: ").removeprefix("--set ")
        raise ConfigError(f"{path}: {_attribute(msg, spec)} (cell {cell_label(cell)})") from None
    return _portable(cfg)


def _portable(cfg: ExperimentConfig) -> ExperimentConfig:
    """Tune runs each trial in its own working directory: data and code paths become absolute, and
    the driver's working directory (where a user's model or algorithm module is found) joins
    `run.code_paths`."""
    cwd = str(Path.cwd())
    paths = [str(Path(p).resolve()) for p in cfg.run.code_paths]
    run = cfg.run.model_copy(update={"code_paths": paths + ([cwd] if cwd not in paths else [])})
    return with_absolute_paths(cfg).model_copy(update={"run": run})


def _attribute(msg: str, spec: StudySpec) -> str:
    """`grid.<key>: ...` or `set.<key>: ...` when the experiment's error is about a study key."""
    bad, _, rest = msg.partition(": ")
    for section, keys in (("grid", spec.grid), ("set", spec.overrides)):
        for key in keys:
            if bad == key or bad.startswith(key + ".") or key.startswith(bad + "."):
                what = "not a key of the experiment config" if rest == "unknown key" else rest
                return f"{section}.{key}: {what}" if bad == key else f"{section}.{key}: {bad}: {what}"
    return f"base: {msg}"


def cell_label(cell: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in cell.items())


def cell_id(cell: dict) -> str:
    """A cell's folder name: its key=value pairs (sorted, so Tune's copy of the config gives the same
    name), cut short, plus a hash of the whole cell so two cells never share a folder."""
    items = sorted(cell.items())
    readable = re.sub(
        r"[^\w.=,-]", "_", ",".join(f"{k.rsplit('.', 1)[-1]}={json.dumps(v)}" for k, v in items)
    )
    digest = hashlib.sha1(json.dumps(items).encode()).hexdigest()[:8]
    return f"{readable[:80]}-{digest}"


# ---------------------------------------------------------------- running it on Ray Tune
def run_study(path: str | Path, resume: str | Path | None = None, progress: bool = False) -> Path:
    """Run (or finish) a study; returns the study directory, which holds study.parquet, study.csv
    and the plots. `resume`: a study directory to finish (else the study's own directory, restored
    when it already holds this study's Tune experiment). Raises StudyIncomplete when cells are
    missing after Tune returns (a failed trial, Ctrl-C); the finished ones are in the table."""
    study = load_study(path)
    directory = Path(resume) if resume is not None else study.directory
    restore = _restorable(study, directory, explicit=resume is not None)
    started = init_ray(study.configs[0].ray.address, study.configs[0].ray.connect_timeout_s)
    try:
        trainable = make_trainable(study, directory, trial_placements(study))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPEC_FILE).write_text(yaml.safe_dump(study.record(), sort_keys=False))
        if restore:
            tuner = tune.Tuner.restore(
                str((directory / TRIALS).resolve()), trainable=trainable, resume_errored=True
            )
        else:
            tuner = build_tuner(study, directory, trainable, progress)
        with contextlib.redirect_stdout(sys.stderr):  # Tune's console notes; stdout is the caller's
            results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    table = study_table(study, results)
    write_table(table, directory)
    plot_study(table, directory)
    if len(table) < len(study.cells):
        raise _incomplete(study, directory, results, len(table))
    return directory


def _restorable(study: Study, directory: Path, explicit: bool) -> bool:
    """Whether `directory` holds this study's Tune experiment; another study there is an error."""
    flag = "--resume: " if explicit else ""
    can = tune.Tuner.can_restore(str((directory / TRIALS).resolve()))
    if explicit and not can:
        raise ConfigError(f"--resume: {directory} holds no Tune experiment to resume (no {TRIALS}/ state)")
    saved = directory / SPEC_FILE
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        new = study.record()
        if any(old.get(k) != new[k] for k in ("base", "set", "grid", "repeats")):
            raise ConfigError(
                f"{flag}{directory}: holds another study (its {SPEC_FILE} differs in base, set, grid "
                f"or repeats); give this study another name: or out_dir:"
            )
    return can


def trial_placements(study: Study) -> dict:
    """cell id -> the trial's placement group (sim.tune's: a sliver for the trial, a bundle per
    worker); a cell whose trial can never be placed on this cluster is an error before anything runs."""
    out = {}
    for cell, cfg in zip(study.cells, study.configs):
        try:
            out[cell_id(cell)] = check_fits(cfg)
        except ConfigError as e:
            raise ConfigError(f"{study.path}: {e} (cell {cell_label(cell)})") from None
    return out


def study_trial(config: dict, cells: dict, study_dir: str) -> None:
    """Tune's function trainable: one full run of the cell's experiment, reporting its summary."""
    cid = cell_id(config)
    cfg = from_dict(cells[cid], source=f"cell {cid}")
    run_dir = Path(study_dir) / "runs" / cid
    tune.report({**cell_metrics(_finished_run(cfg, run_dir)), "run_dir": str(run_dir)})


def _finished_run(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """The run's summary: read when the run finished before (a restored study repeats no run),
    continued from the run's checkpoint when it stopped midway, else a fresh run."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        pass  # not finished, or its summary was damaged: the checkpoint decides
    resume = (run_dir / "checkpoint.pt").is_file()
    return run_experiment(cfg, run_dir=run_dir, resume=resume, progress=None)[1]


def cell_metrics(summary: dict) -> dict[str, float]:
    """The table's metric columns from a summary.json: a {mean, sd, min, max} gives its mean; a
    missing or non-numeric value is NaN."""
    out = {}
    for key in METRICS:
        v = summary.get(key)
        v = v.get("mean") if isinstance(v, dict) else v
        out[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    return out


def make_trainable(study: Study, directory: Path, placements: dict):
    """The trial function with its fixed arguments and per-cell resources (also what restore needs)."""
    trainable = tune.with_parameters(
        study_trial, cells=study.raw_configs(), study_dir=str(directory.resolve())
    )
    return tune.with_resources(trainable, lambda config: placements[cell_id(config)])


def build_tuner(study: Study, directory: Path, trainable, progress: bool) -> tune.Tuner:
    space = {k: tune.grid_search(list(v)) for k, v in study.spec.grid.items()}
    space["seed"] = tune.grid_search(sorted({c["seed"] for c in study.cells}))
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=TRIALS,
            storage_path=str(directory.resolve()),
            verbose=0,
            callbacks=[CellLog(len(study.cells))] if progress else None,
        ),
    )


def _trial_dirname(trial) -> str:
    return cell_id(trial.config)


class CellLog(tune.Callback):
    """One line on stderr per finished or failed trial (Tune itself runs quietly)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"study: {self.done}/{self.total} cells done ({cell_label(trial.config)})", file=sys.stderr)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"study: cell failed ({cell_label(trial.config)}); see {trial.local_path}", file=sys.stderr)


def _incomplete(study: Study, directory: Path, results, done: int) -> StudyIncomplete:
    errors = [e for e in results.errors if e is not None]
    first = str(errors[0]).strip().splitlines()[-1] if errors else ""
    why = f"{len(errors)} failed, first: {first}" if errors else "interrupted"
    return StudyIncomplete(
        f"{done} of {len(study.cells)} cells finished ({why}); finished cells are in "
        f"{directory / 'study.parquet'}; finish with `fedmeta study {study.path} --resume "
        f"{directory}`",
        directory,
        interrupted=not errors,
    )


# ---------------------------------------------------------------- the table
def study_table(study: Study, results) -> pd.DataFrame:
    """One row per finished cell and seed, in the grid's order: the grid keys, seed, run_dir, metrics."""
    order = {cell_id(c): i for i, c in enumerate(study.cells)}
    rows = {}
    for r in results:
        if r.error is not None or not r.metrics or "run_dir" not in r.metrics:
            continue
        cell = {k: r.config[k] for k in (*study.keys, "seed")}
        rows[order[cell_id(cell)]] = {
            **cell,
            "run_dir": r.metrics["run_dir"],
            **{m: _float(r.metrics.get(m)) for m in METRICS},
        }
    columns = [*study.keys, *ID_COLUMNS, *METRICS]
    table = pd.DataFrame([rows[i] for i in sorted(rows)], columns=columns)
    for key in study.keys:
        table[key] = _one_type(table[key])
    return table


def _float(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _one_type(col: pd.Series) -> pd.Series:
    """Parquet needs one type per column: values of mixed kinds (e.g. 20 and 'auto') become text."""
    kinds = {type(v) for v in col if v is not None}
    return (
        col if len(kinds) <= 1 or kinds <= {int, float} else col.map(lambda v: None if v is None else str(v))
    )


def write_table(table: pd.DataFrame, directory: Path) -> None:
    table.to_parquet(directory / "study.parquet", index=False)
    table.to_csv(directory / "study.csv", index=False)
