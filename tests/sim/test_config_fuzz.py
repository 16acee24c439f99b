"""Hostile configs, generated: whatever a YAML file holds, loading it either gives a valid config or a
one-line ConfigError naming the key path (the CLI turns that into exit 2), never a traceback.

The strategies walk the config schema itself (ExperimentConfig's fields), so every key path of every
section is reached, including sections added later."""

import subprocess
import sys
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedmeta.sim import config as C

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _walk(model: type[BaseModel], prefix: tuple = ()):
    """(path, FieldInfo, is_section) for every key of the schema, depth first."""
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        sub = (
            info.annotation
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            else None
        )
        yield path, info, sub is not None
        if sub is not None:
            yield from _walk(sub, path)


SECTIONS = [()] + [p for p, _, is_section in _walk(C.ExperimentConfig) if is_section]
LEAVES = [(p, info) for p, info, is_section in _walk(C.ExperimentConfig) if not is_section]
DEFAULTS = C.ExperimentConfig().model_dump(mode="json")


def _default(path):
    node = DEFAULTS
    for k in path:
        node = node[k]
    return node


def _numeric(path, info) -> bool:
    value = _default(path)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NUMERIC = [(p, i) for p, i in LEAVES if _numeric(p, i)]
BOUNDED = [(p, i, m) for p, i in NUMERIC for m in i.metadata if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt))]


def _doc(path: tuple, value) -> dict:
    """A config that is the defaults except `value` at `path` (sections created on the way)."""
    raw: dict = {}
    node = raw
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return raw


def _dotted(path) -> str:
    return ".".join(map(str, path))


# each strategy draws (YAML text, the key path the error must name, or None when the value may be valid)
def unknown_keys():
    return st.tuples(st.sampled_from(SECTIONS), st.from_regex(r"zz_[a-z0-9_]{1,12}", fullmatch=True)).map(
        lambda s: (yaml.safe_dump(_doc((*s[0], s[1]), 1)), _dotted((*s[0], s[1])))
    )


WRONG = [{"zz_fuzz": 1}, [{"zz_fuzz": 1}]]


def wrong_types():
    def pick(leaf, value):
        path, _ = leaf
        default = _default(path)
        if isinstance(default, bool):
            value = "yes" if value is None else value
        elif isinstance(default, (int, float)):
            value = "many" if value is None else value
        elif isinstance(default, str):
            value = [1] if value is None else value
        elif value is None:
            value = {"zz_fuzz": 1}
        return yaml.safe_dump(_doc(path, value)), _dotted(path)

    return st.builds(pick, st.sampled_from(LEAVES), st.sampled_from([None, *WRONG]))


def out_of_range():
    def pick(bound, margin):
        path, info, m = bound
        integer = isinstance(_default(path), int)
        if isinstance(m, (at.Ge, at.Gt)):
            edge = m.ge if isinstance(m, at.Ge) else m.gt
            value = edge - (1 if integer or isinstance(m, at.Ge) else 0) - margin
        else:
            edge = m.le if isinstance(m, at.Le) else m.lt
            value = edge + (1 if integer or isinstance(m, at.Le) else 0) + margin
        return yaml.safe_dump(_doc(path, int(value) if integer else float(value))), _dotted(path)

    return st.builds(pick, st.sampled_from(BOUNDED), st.integers(0, 10**6))


def non_mappings():
    return st.tuples(st.sampled_from(SECTIONS[1:]), st.sampled_from([[1, 2], "text", 3, 1.5, True])).map(
        lambda s: (yaml.safe_dump(_doc(s[0], s[1])), _dotted(s[0]))
    )


def huge_numbers():
    def pick(leaf, exponent, sign):
        path, _ = leaf
        return yaml.safe_dump(_doc(path, sign * 10**exponent)), _dotted(path)

    return st.builds(pick, st.sampled_from(NUMERIC), st.integers(19, 400), st.sampled_from([1, -1]))


def not_finite():
    return st.tuples(st.sampled_from(NUMERIC), st.sampled_from([".nan", ".inf", "-.inf", "1.0e+999"])).map(
        lambda s: (yaml.safe_dump(_doc(s[0][0], "@V@")).replace("'@V@'", s[1]), _dotted(s[0][0]))
    )


def syntax_errors():
    base = yaml.safe_dump(DEFAULTS, sort_keys=False).splitlines()
    junk = ["  bad: [unclosed", "\tfederation: 1", "key: 'open", "- [1, 2", "a: b: c", "{", "? ? ?", "@at"]

    def pick(line, bad):
        lines = list(base)
        lines.insert(line % (len(lines) + 1), bad)
        return "\n".join(lines) + "\n", "not valid YAML"

    return st.builds(pick, st.integers(0, 10**6), st.sampled_from(junk))


def top_level():
    docs = [
        "- 1\n- 2\n",
        "just text\n",
        "42\n",
        "1: 2\n",
        "? [a, b]\n: 1\n",
        "!!python/object/apply:os.system [echo]\n",
        "federation: !!python/name:os.system\n",
        "a: &a [1, 2]\nb: *c\n",
        "[" * 5000 + "]" * 5000 + "\n",
    ]
    return st.sampled_from(docs).map(lambda d: (d, None))


def anything():
    return st.text(max_size=200).map(lambda t: (t, None))


def _load(tmp_path: Path, text: str):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text, encoding="utf-8")
    return C.load(p)


def _check(tmp_path, case):
    text, names = case
    try:
        _load(tmp_path, text)
    except C.ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600, msg
        if names is not None:
            assert names in msg, (names, msg)
    else:
        assert names is None or names == "valid", f"accepted a config that must fail at {names}: {text!r}"


@pytest.mark.parametrize(
    "kind", [unknown_keys, wrong_types, out_of_range, non_mappings, huge_numbers, not_finite, syntax_errors]
)
def test_malformed_configs_name_their_key(kind, tmp_path):
    @FUZZ
    @given(kind())
    def prop(case):
        _check(tmp_path, case)

    prop()


@pytest.mark.parametrize("kind", [top_level, anything])
def test_any_document_loads_or_fails_in_one_line(kind, tmp_path):
    @FUZZ
    @given(kind())
    def prop(case):
        _check(tmp_path, case)

    prop()


def test_schema_walk_reaches_every_section():
    assert ("federation", "system") in SECTIONS and ("data", "table", "partition") in SECTIONS
    assert len(LEAVES) > 100 and len(BOUNDED) > 50


NINE = {
    "syntax": ("federation:\n  rounds: [2\n", "not valid YAML (line"),
    "top_level": ("- federation\n- rounds\n", "expected a mapping"),
    "section": ("federation: 3\n", "federation"),
    "unknown_deep": (
        "federation:\n  system:\n    speed_sigmaa: 1\n",
        "federation.system.speed_sigmaa: unknown key",
    ),
    "wrong_type": ("privacy:\n  clip_norm: high\n", "privacy.clip_norm"),
    "out_of_range": ("secagg:\n  quant_bits: 31\n", "secagg.quant_bits"),
    "huge": ("data:\n  num_clients: " + "9" * 400 + "\n", "data.num_clients"),
    "not_finite": ("algorithm:\n  inner_lr: .nan\n", "algorithm.inner_lr"),
    "unsafe_tag": ("run:\n  name: !!python/object/apply:os.system [echo pwned]\n", "not valid YAML"),
}


@pytest.mark.parametrize("kind", sorted(NINE))
def test_cli_exits_2_with_one_line_for_nine_kinds(kind, tmp_path):
    text, expected = NINE[kind]
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "fedmeta", "run", str(p), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr and expected in lines[0], r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started, nothing written
