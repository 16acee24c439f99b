"""MkDocs hook: the configuration reference (docs/reference/config.md), generated from the schema.

The experiment config is `fedmeta.sim.config.ExperimentConfig`, pydantic v2 models, one per
section. This walks `model_fields` recursively and writes one table per section: every key path
(`federation.rounds`; a list of sections as `tune.params[].key`), its type, its default, its bounds
and its `Field(description=...)` (blank where the schema has none). The page's placeholder
`<!-- config-reference -->` is replaced at build time, so the reference cannot drift from the code.

`config_rows()` is also what tests/docs/test_docs.py checks against what `fedmeta config` prints.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, NamedTuple, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PAGE = "reference/config.md"
MARKER = "<!-- config-reference -->"


class Row(NamedTuple):
    path: str  # dotted key path; the keys of a list of sections are `path[].key`
    type: str
    default: str
    bounds: str
    description: str
    section: str  # the dotted path of the section this key belongs to ("" = top level)
    kind: str  # "key", "section" (a nested section) or "list" (a list of sections)


def _strip(annotation: Any) -> Any:
    """Annotated[X, ...] -> X."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _list_model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        return _model_of(item)
    return None


def type_name(annotation: Any) -> str:
    """A YAML-minded name: `int`, `float or null`, one of `mlp`, `cnn`, `list[int]`."""
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        values = [("null" if v is None else str(v)) for v in typing.get_args(annotation)]
        return " or ".join(f'"{v}"' for v in values)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"list[{type_name(item)}]"
    if origin is dict:
        return "mapping"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return {"str": "string", "bool": "boolean"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _bounds(field: FieldInfo) -> str:
    marks = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                marks.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            marks.append(f"at least {m.min_length} {'entry' if m.min_length == 1 else 'entries'}")
        if isinstance(m, annotated_types.MaxLen):
            marks.append(f"at most {m.max_length} {'entry' if m.max_length == 1 else 'entries'}")
    return ", ".join(marks)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    if value is None:
        return "`null`"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").strip()
    if len(text) > 90:
        n = len(value) if isinstance(value, (list, dict)) else None
        return f"{n} entries, as `fedmeta config` prints them" if n is not None else f"`{text[:87]}...`"
    return f"`{text}`"


def config_rows(model: type[BaseModel] | None = None, prefix: str = "") -> list[Row]:
    """Every key of the schema, depth first in declaration order."""
    if model is None:
        from fedmeta.sim.config import ExperimentConfig

        model = ExperimentConfig
    rows: list[Row] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub, items = _model_of(field.annotation), _list_model_of(field.annotation)
        desc = (field.description or "").strip()
        if sub is not None:
            rows.append(
                Row(
                    path,
                    "section",
                    "",
                    "",
                    desc or (sub.__doc__ or "").strip(),
                    prefix.rstrip("."),
                    "section",
                )
            )
            rows += config_rows(sub, path + ".")
        elif items is not None:
            rows.append(
                Row(
                    path,
                    "list of sections (below)",
                    _default(field),
                    _bounds(field),
                    desc or (items.__doc__ or "").strip(),
                    prefix.rstrip("."),
                    "list",
                )
            )
            rows += config_rows(items, path + "[].")
        else:
            rows.append(
                Row(
                    path,
                    type_name(field.annotation),
                    _default(field),
                    _bounds(field),
                    desc,
                    prefix.rstrip("."),
                    "key",
                )
            )
    return rows


def _cell(text: str) -> str:
    """One table cell: on one line, a `|` outside code spans escaped (inside them it is kept)."""
    parts = " ".join(str(text).split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def render() -> str:
    rows = config_rows()
    sections: dict[str, list[Row]] = {}
    intros: dict[str, str] = {"": ""}
    for r in rows:
        if r.kind == "section":
            intros[r.path] = r.description
            sections.setdefault(r.path, [])
        else:
            sections.setdefault(r.section, []).append(r)  # a list is a key of its section, too
            if r.kind == "list":
                intros[r.path + "[]"] = r.description
                sections.setdefault(r.path + "[]", [])
    out: list[str] = []
    for section, keys in sections.items():
        if not keys:
            continue
        title = section or "Top level"
        level = "##" if section.count(".") == 0 else "###"
        out.append(f"{level} {_code(section) if section else title}\n")
        if intros.get(section):
            out.append(_cell(intros[section]) + "\n")
        out.append("| key | type | default | bounds | description |")
        out.append("|---|---|---|---|---|")
        for r in keys:
            out.append(
                f"| `{r.path}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.bounds)} | {_cell(r.description)} |"
            )
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE}: the placeholder {MARKER} is missing")
    return markdown.replace(MARKER, render())
