"""The documentation: the tutorials' marked code blocks run, the README stays a product page, the
references cover the code, every repository path the docs name exists, and the site builds
strictly.

Markers (docs/contributing.md): an HTML comment on the line just before a fence,
`<!-- run -->` (execute the python block), `<!-- run slow -->` (execute it in the slow tier),
`<!-- file=NAME -->` (write the block to NAME in the page's working directory), or
`<!-- file=NAME run -->` (both). A page's blocks run in order, in one namespace, in a fresh
working directory.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
README = ROOT / "README.md"

# the README's first set-up command, byte for byte (the second may change: it is checked by shape)
SETUP_RUN = (
    "pip install -c requirements/lock.txt torch==2.13.0 && pip install -c requirements/lock.txt -e . "
    "&& fedmeta run"
)
ISSUE = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)


# ---------------------------------------------------------------- code blocks
@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    run: bool
    slow: bool
    file: str | None


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a page with the marker just before each (unmarked ones included)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        marker = MARKER.match(lines[start - 1]) if start else None
        run = slow = False
        file = None
        for token in marker.group(1).split() if marker else []:
            if token == "run":
                run = True
            elif token == "slow":
                slow = True
            elif token.startswith("file="):
                file = token.removeprefix("file=")
            else:
                raise ValueError(
                    f"{path.name}:{start}: unknown docs-test marker {token!r} in {lines[start - 1]!r}"
                )
        if slow and not run:
            raise ValueError(f"{path.name}:{start}: `slow` without `run`")
        if run and lang != "python":
            raise ValueError(
                f"{path.name}:{start + 1}: only python blocks run (this one is {lang or 'plain'})"
            )
        out.append(Block(path.name, start + 1, lang, "\n".join(body) + "\n", run, slow, file))
    return out


def _marked(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.run or b.file]


def _execute(page: Path, tmp_path: Path, monkeypatch, include_slow: bool) -> None:
    todo = [b for b in _marked(page) if include_slow or not b.slow]
    written = [Path(b.file).stem for b in todo if b.file and b.file.endswith(".py")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in written:  # a module of that name from another test is not this one
        sys.modules.pop(name, None)
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    try:
        for b in todo:
            if b.file:
                (tmp_path / b.file).write_text(b.code, encoding="utf-8")
            if b.run:
                exec(compile(b.code, f"docs/tutorials/{b.page}:{b.line}", "exec"), namespace)  # noqa: S102
    finally:
        for name in written:
            sys.modules.pop(name, None)


FAST_PAGES = [p for p in TUTORIALS if any(b.run and not b.slow for b in _marked(p))]
SLOW_PAGES = [p for p in TUTORIALS if any(b.slow for b in _marked(p))]


def test_the_markers_are_found():
    """The runnable examples exist (a parser that finds none would make the tests below vacuous)."""
    assert len(TUTORIALS) >= 7
    assert FAST_PAGES and SLOW_PAGES
    for page in TUTORIALS:
        blocks(page)  # every marker well formed


@pytest.mark.parametrize("page", FAST_PAGES, ids=lambda p: p.stem)
def test_tutorial_blocks_run(page, tmp_path, monkeypatch):
    _execute(page, tmp_path, monkeypatch, include_slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=lambda p: p.stem)
def test_tutorial_blocks_run_with_the_slow_ones(page, tmp_path, monkeypatch, request):
    request.getfixturevalue("ray_session")  # the suite's one local Ray
    _execute(page, tmp_path, monkeypatch, include_slow=True)


# ---------------------------------------------------------------- the README
def test_the_readme_is_a_product_page():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 320, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[0] == "```bash" and lines[3] == "```"
    assert lines[1] == SETUP_RUN
    assert lines[2].startswith("pip install ") and "pytest" in lines[2]
    assert not ISSUE.search(text), (
        f"README.md mentions {ISSUE.search(text).group(0)!r}: history goes to CHANGELOG.md"
    )
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "README.md holds a dated note"
    for word in ("pypi.org", "pythonhosted.org", "/work/", "../shared", " VM", "dev machine"):
        assert word not in text, f"README.md mentions {word!r}"
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)", text):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_the_docs_tell_no_history():
    for path in [*DOCS.rglob("*.md"), ROOT / "CHANGELOG.md"]:
        text = path.read_text(encoding="utf-8")
        found = ISSUE.search(text)
        assert not found, f"{path.relative_to(ROOT)} mentions {found.group(0)!r}"
        assert "../shared" not in text and "/work/" not in text, (
            f"{path.relative_to(ROOT)}: a path outside the repository"
        )


# ---------------------------------------------------------------- paths and names the docs cite
PATH = re.compile(r"`((?:sim|actors|serve|configs|tests|notebooks|requirements|docs|\.ci)/[^`\s]*)`")
PY_FILE = re.compile(r"(?<![\w$/.-])((?:sim|actors|serve|tests)/[\w/]+\.py)\b")  # in code blocks too
MODULE = re.compile(r"`(fedmeta(?:\.\w+)+(?::\w+)?)`")


def _expand(pattern: str) -> list[str]:
    """`a/{b,c}.py` -> a/b.py, a/c.py."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _cited(regex: re.Pattern) -> list[tuple[str, str]]:
    # not CHANGELOG.md: it names the old paths of what moved
    files = [README, *DOCS.rglob("*.md")]
    return sorted(
        {(str(f.relative_to(ROOT)), m) for f in files for m in regex.findall(f.read_text(encoding="utf-8"))}
    )


@pytest.mark.parametrize(
    ("where", "cited"), sorted(set(_cited(PATH)) | set(_cited(PY_FILE))), ids=lambda x: x
)
def test_every_cited_path_exists(where, cited):
    cited = cited.split("::")[0].rstrip(".,;:)")
    if "<" in cited:  # a placeholder (`personalized/<id>.npy`)
        return
    for path in _expand(cited):
        assert list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists(), f"{where} cites {path}"


def _defines(module_file: Path, name: str) -> bool:
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (a.asname or a.name) == name for a in node.names
        ):
            return True
    return False


@pytest.mark.parametrize(("where", "cited"), _cited(MODULE), ids=lambda x: x)
def test_every_cited_module_and_name_exists(where, cited):
    """`fedmeta.sim.seeding.client_keys`, `fedmeta.serve.app:member_builder`: the module's file
    exists and defines the name (read statically: nothing is imported)."""
    dotted = cited.replace(":", ".").split(".")[1:]
    for cut in range(len(dotted), -1, -1):
        base = ROOT.joinpath(*dotted[:cut])
        module = base.with_suffix(".py") if cut else ROOT / "__init__.py"
        if cut and not module.is_file():
            module = base / "__init__.py"
        if module.is_file():
            rest = dotted[cut:]
            assert len(rest) <= 1, (
                f"{where} cites {cited}: {'.'.join(rest)} is not in {module.relative_to(ROOT)}"
            )
            assert not rest or _defines(module, rest[0]), (
                f"{where} cites {cited}, not defined in {module.relative_to(ROOT)}"
            )
            return
    pytest.fail(f"{where} cites {cited}: no such module")


# ---------------------------------------------------------------- the generated references
def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _leaves(node, path: str = "") -> set[str]:
    if isinstance(node, dict):
        return (
            set().union(*(_leaves(v, f"{path}.{k}" if path else k) for k, v in node.items()))
            if node
            else {path}
        )
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        return set().union(*(_leaves(v, f"{path}[]") for v in node))
    return {path}


def test_the_config_reference_has_every_key_fedmeta_config_prints():
    from typer.testing import CliRunner

    import fedmeta
    from fedmeta.sim.cli.main import app

    hook = _hook("config_reference")
    rows = hook.config_rows()
    keys = {r.path for r in rows}
    page = hook.render()
    runner = CliRunner()
    for preset in fedmeta.presets():
        result = runner.invoke(app, ["config", preset])
        assert result.exit_code == 0, result.output
        printed = yaml.safe_load(result.output)
        for leaf in _leaves(printed):
            assert leaf in keys or any(k.startswith(leaf + ".") for k in keys), (
                f"`fedmeta config {preset}` prints {leaf}, which the reference lacks"
            )
    for r in rows:
        assert f"`{r.path}`" in page
    assert {
        "federation.rounds",
        "privacy.leakage_control.target_auc",
        "tune.params[].key",
        "ray.compute",
    } <= keys


def test_the_cli_reference_has_every_command_and_option():
    import click
    import typer.main

    from fedmeta.sim.cli.main import app

    page = _hook("cli_reference").render()

    def walk(cmd: click.Command, path: list[str]):
        assert f"`{' '.join(path)}`" in page or len(path) == 1
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("-"):
                    assert f"`{opt}`" in page, f"{' '.join(path)} {opt} is not in the CLI reference"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), ["fedmeta"])


# ---------------------------------------------------------------- the site
@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
    assert "federation.rounds" in (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
