"""docs/architecture.md cannot rot silently: every file and name it points at exists.

Backticked references are read from the page: a path in one of the repository's folders ending in
``.py`` (or ``.sh``, ``.md``, ``.toml``, or a folder ending in ``/``), or a top-level ``.py``/``.toml``/``.md``
file, must exist in the repository; a dotted name starting at a
top-level folder (``actors.verifier.monitor.Monitor.run``, ``protocol.quote.parse_quote``,
``tests.interop.support.Upstream``) must resolve: the longest prefix that is a module file, then
each remaining part a class, function or assignment defined in it (read with ``ast``, nothing is
imported).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
ROOTS = ("actors", "protocol", "testbed", "scenarios", "bench", "tests", "deploy")
FOLDERS = (*ROOTS, "docs", "scripts", ".ci")  # a path elsewhere (unzipped/) is a runtime one
_TICKED = re.compile(r"`([^`\s]+)`")
_PATH = re.compile(r"^(?:[\w.-]+/)+(?:[\w.-]+\.(?:py|sh|md|toml))?$|^[\w.-]+\.(?:py|toml|md)$")
_DOTTED = re.compile(r"^(?:" + "|".join(ROOTS) + r")(?:\.\w+)+$")


def references(text: str) -> tuple[list[str], list[str]]:
    """The file paths and the dotted names among the page's backticked words."""
    paths, names = [], []
    for word in _TICKED.findall(text):
        word = word.rstrip(",.;:")
        if "{" in word or "*" in word or word.startswith("/"):
            continue  # a pattern (tests/actors/{agent,...}/, /v{ver}/...), not one file
        if _PATH.match(word) and (word.split("/")[0] in FOLDERS or "/" not in word):
            paths.append(word)
        elif _DOTTED.match(word):
            names.append(word)
    return paths, names


def _defined(body: list[ast.stmt]) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            for a in node.names:  # a name the module re-exports by importing it
                out[(a.asname or a.name).split(".")[0]] = node
    return out


def resolve(name: str, repo: Path = REPO) -> str | None:
    """None when ``name`` exists, else what is missing."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        base = repo.joinpath(*parts[:cut])
        for file in (base.with_suffix(".py"), base / "__init__.py"):
            if file.is_file():
                scope: ast.AST = ast.parse(file.read_text(encoding="utf-8"))
                for i, part in enumerate(parts[cut:]):
                    found = _defined(getattr(scope, "body", []))
                    if part not in found:
                        return f"{'.'.join(parts[:cut + i])} defines no {part!r} ({file.relative_to(repo)})"
                    scope = found[part]
                return None
    return f"no module file for {name}"


def test_every_reference_exists() -> None:
    paths, names = references(DOC.read_text(encoding="utf-8"))
    # the page names dozens of each: an extractor that finds nothing proves nothing
    assert len(paths) > 30 and len(names) > 60, (len(paths), len(names))
    missing = [p for p in paths if not (REPO / p).exists()]
    missing += [problem for n in names if (problem := resolve(n)) is not None]
    assert not missing, "docs/architecture.md points at what does not exist:\n" + "\n".join(missing)


def test_the_check_sees_a_stale_reference(tmp_path: Path) -> None:
    """A renamed function, a moved file and a missing method are all reported."""
    (tmp_path / "actors").mkdir()
    (tmp_path / "actors" / "m.py").write_text("class A:\n    def run(self): ...\n\ndef f(): ...\nX = 1\n")
    assert resolve("actors.m.A.run", tmp_path) is None
    assert resolve("actors.m.f", tmp_path) is None
    assert resolve("actors.m.X", tmp_path) is None
    assert resolve("actors.m.g", tmp_path) is not None
    assert resolve("actors.m.A.stop", tmp_path) is not None
    assert resolve("actors.n.f", tmp_path) is not None
    paths, names = references("see `actors/m.py`, `tests/x/`, `setup.py` and `actors.m.A.run`; "
                              "not `keytrio tenant`, `unzipped/` or `/v{ver}/quotes`")
    assert paths == ["actors/m.py", "tests/x/", "setup.py"] and names == ["actors.m.A.run"]
