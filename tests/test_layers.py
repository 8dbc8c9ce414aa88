"""The house's one-way arrows, read from the source: scenarios -> testbed -> actors -> protocol.

protocol/ imports nothing of ours above it and no I/O library; no actor imports another actor
(they meet over HTTP(S) only; actors/common and the top-level cli.py wiring are shared);
everything of ours is imported under the one installed name `keytrio`; no modules of ours import
each other in a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("actors", "protocol", "testbed", "scenarios")
FLOOR = {"protocol": 0, "actors": 1, "testbed": 2, "scenarios": 3}
# what protocol/ may not import: sockets, files-as-services, clocks-as-schedulers, databases, HTTP
PROTOCOL_FORBIDDEN = {"trio", "socket", "ssl", "subprocess", "sqlalchemy", "httpx", "h11", "quart",
                      "quart_trio", "hypercorn", "asyncio", "threading", "time", "pathlib", "shutil",
                      "tempfile", "logging"}
ACTORS = sorted(p.name for p in (REPO / "actors").iterdir()
                if p.is_dir() and p.name not in ("common", "__pycache__"))


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _sources(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("root", ROOTS)
def test_arrows_point_down(root: str):
    bad = []
    for path in _sources(root):
        rel = path.relative_to(REPO)
        for line, mod in _imports(path):
            parts = mod.split(".")
            if parts[0] in ROOTS:
                bad.append(f"{rel}:{line} imports {mod} without the keytrio. prefix")
                continue
            if parts[0] != "keytrio" or len(parts) < 2 or parts[1] not in FLOOR:
                if root == "protocol" and parts[0] in PROTOCOL_FORBIDDEN:
                    bad.append(f"{rel}:{line}: protocol/ is pure but imports {mod}")
                continue
            if FLOOR[parts[1]] > FLOOR[root]:
                bad.append(f"{rel}:{line}: {root}/ imports {mod}, a floor above it")
            if (root == "actors" and parts[1] == "actors" and len(rel.parts) > 2 and rel.parts[1] in ACTORS
                    and len(parts) > 2 and parts[2] in ACTORS and parts[2] != rel.parts[1]):
                bad.append(f"{rel}:{line}: actor {rel.parts[1]} imports actor {parts[2]} ({mod})")
    assert not bad, "\n".join(bad)


#: what a C extension in protocol/ may include: the interpreter's API, libcrypto's digests and the C
#: library's integer and memory headers; no stdio, files, sockets, threads or clocks
PROTOCOL_C_INCLUDES = {"Python.h", "openssl/evp.h", "openssl/err.h", "stdint.h", "string.h"}


def _c_includes(path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if (m := re.match(r'\s*#\s*include\s*[<"]([^>"]+)[>"]', line))]


def test_protocol_c_sources_stay_pure():
    sources = sorted((REPO / "protocol").rglob("*.c"))
    assert sources and all(("Python.h" in dict(_c_includes(p)).values()) for p in sources)  # the check reads them
    bad = [f"{p.relative_to(REPO)}:{n} includes {h}" for p in sources for n, h in _c_includes(p)
           if h not in PROTOCOL_C_INCLUDES]
    assert not bad, "\n".join(bad)


def test_tests_and_bench_import_ours_by_the_installed_name():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _sources("tests", "bench")
           for line, mod in _imports(p) if mod.split(".")[0] in ROOTS]
    assert not bad, "\n".join(bad)


def test_test_modules_import_no_test_module():
    """Shared helpers live in support modules and conftest files: a test module imported by another
    is collected twice over and ties two test files together."""
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _sources("tests", "bench")
           for line, mod in _imports(p) if mod.startswith("tests.") and mod.split(".")[-1].startswith("test_")]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path):
    """The rule above reads real import statements (a check that cannot fail proves nothing)."""
    bad = tmp_path / "x.py"
    bad.write_text("from keytrio.actors.verifier import app\nimport trio\nfrom protocol import quote\n")
    mods = [m for _, m in _imports(bad)]
    assert mods == ["keytrio.actors.verifier", "trio", "protocol"]


# --- no import circles -------------------------------------------------------------------------------

#: where keytrio's installed modules live: no two of them may import each other in a circle, not even
#: under TYPE_CHECKING or inside a function (a circle is two rooms that cannot be read, or changed,
#: one without the other). Issue 18 broke the last ones; nothing is allowed to stay in a circle.
HOUSE = (*ROOTS, "deploy")


def _module_name(path: Path, base: Path = REPO) -> str:
    rel = path.relative_to(base).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("keytrio", *parts))


def _absolute(name: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The module a ``from`` import names, relative ones (``from . import x``) resolved."""
    if node.level == 0:
        return node.module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _import_graph(paths: list[Path], base: Path = REPO) -> dict[str, set[str]]:
    """module -> the modules of ``paths`` it imports, every statement counted (TYPE_CHECKING blocks,
    function bodies, relative imports). ``from pkg import x`` counts as both ``pkg`` (its __init__
    runs, and whatever that imports) and ``pkg.x`` when x is a module."""
    known = {_module_name(p, base): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(name, node, path.name == "__init__.py")
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    circles = _circles(_import_graph(_sources(*HOUSE)))
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_sees_a_circle():
    """Two modules that import each other (one only under TYPE_CHECKING) form a circle."""
    graph = {"keytrio.a": {"keytrio.b"}, "keytrio.b": {"keytrio.a"}, "keytrio.c": {"keytrio.a"}}
    assert _circles(graph) == [["keytrio.a", "keytrio.b"]]


def test_the_graph_counts_every_kind_of_import(tmp_path: Path):
    """Read from real files: a TYPE_CHECKING import, a relative one, and ``from pkg import name``
    through a package whose __init__ imports the sibling all close a circle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from keytrio.pkg.b import B\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from keytrio.pkg.c import C\n")
    (pkg / "b.py").write_text("from . import a\nB = 1\n")
    (pkg / "c.py").write_text("from keytrio.pkg import B\nC = 1\n")
    (pkg / "d.py").write_text("import keytrio.pkg.a\n")
    graph = _import_graph(sorted(pkg.glob("*.py")), tmp_path)
    assert graph["keytrio.pkg.b"] == {"keytrio.pkg", "keytrio.pkg.a"}
    assert _circles(graph) == [["keytrio.pkg", "keytrio.pkg.a", "keytrio.pkg.b", "keytrio.pkg.c"]]
