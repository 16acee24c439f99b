"""MkDocs hook: the command-line reference (docs/reference/cli.md), generated from the typer app.

`fedmeta.sim.cli.main.app` is turned into its click command (what `fedmeta <cmd> --help` prints
from) and every command, sub-command, argument and option is written out with its type, default
and help. The page's placeholder `<!-- cli-reference -->` is replaced at build time.
"""

from __future__ import annotations

import click

PAGE = "reference/cli.md"
MARKER = "<!-- cli-reference -->"


def _cell(text: str) -> str:
    """One table cell: on one line, a `|` outside code spans escaped (inside them it is kept)."""
    parts = " ".join(str(text).split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _type(param: click.Parameter, ctx: click.Context) -> str:
    display = getattr(param, "display_type", None)
    if callable(display):
        try:
            text = display(ctx)
        except Exception:  # another typer: fall back to click's own name
            text = None
        if text:
            return str(text).strip("<>").removesuffix(" range")
    kind = getattr(param, "type", None)
    return (getattr(kind, "name", "") or "").removesuffix(" range")


def _default(param: click.Parameter) -> str:
    value = param.default
    if callable(value) or value is None or value == () or value == []:
        return ""
    if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
        return param.opts[0] if value else param.secondary_opts[0]
    if getattr(param, "is_flag", False):
        return "" if not value else "on"
    return f"`{value}`"


def _bounds(param: click.Parameter) -> str:
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    parts = ([f"≥ {lo}"] if lo is not None else []) + ([f"≤ {hi}"] if hi is not None else [])
    return ", ".join(parts)


def _params_table(cmd: click.Command, ctx: click.Context) -> list[str]:
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if getattr(p, "param_type_name", "") == "argument" or isinstance(p, click.Argument):
            name = f"`{p.metavar or p.name.upper()}`"
            kind = (
                "argument" + ("" if p.required else ", optional") + (", repeatable" if p.nargs == -1 else "")
            )
        else:
            names = " / ".join(f"`{o}`" for o in [*p.opts, *getattr(p, "secondary_opts", [])])
            name = names
            kind = (
                "option"
                + (", repeatable" if getattr(p, "multiple", False) else "")
                + (", required" if p.required else "")
            )
        rows.append(
            f"| {name} | {kind} | {_cell(_type(p, ctx))} | {_default(p)} | {_cell(_bounds(p))} "
            f"| {_cell(getattr(p, 'help', '') or '')} |"
        )
    if not rows:
        return []
    return ["| name | kind | type | default | bounds | help |", "|---|---|---|---|---|---|", *rows, ""]


def _command(cmd: click.Command, path: list[str], parent: click.Context, level: int) -> list[str]:
    ctx = click.Context(cmd, info_name=path[-1], parent=parent)
    out = [f"{'#' * level} `{' '.join(path)}`", ""]
    usage = cmd.get_usage(ctx).removeprefix("Usage: ")
    out += ["```text", usage, "```", ""]
    if cmd.help:
        out += [" ".join(cmd.help.split()), ""]
    out += _params_table(cmd, ctx)
    if getattr(cmd, "commands", None):  # a group (typer's groups need not subclass click's)
        for name in cmd.list_commands(ctx):
            out += _command(cmd.commands[name], [*path, name], ctx, min(level + 1, 4))
    return out


def render() -> str:
    import typer.main

    from fedmeta.sim.cli.main import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="fedmeta")
    out = ["## Global options", "", "```text", root.get_usage(ctx).removeprefix("Usage: "), "```", ""]
    out += _params_table(root, ctx)
    for name in root.list_commands(ctx):
        out += _command(root.commands[name], ["fedmeta", name], ctx, 2)
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE}: the placeholder {MARKER} is missing")
    return markdown.replace(MARKER, render())
