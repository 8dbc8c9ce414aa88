"""The house's one-way arrows, read from the source: scenarios -> testbed -> actors -> protocol.

protocol/ imports nothing of ours above it and no I/O library; no actor imports another actor
(they meet over HTTP(S) only; actors/common and the top-level cli.py wiring are shared);
everything of ours is imported under the one installed name `keytrio`; inside the packages of
NO_CIRCLES no modules import each other in a circle.
"""

from __future__ import annotations

import ast
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


def test_tests_and_bench_import_ours_by_the_installed_name():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _sources("tests", "bench")
           for line, mod in _imports(p) if mod.split(".")[0] in ROOTS]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path):
    """The rule above reads real import statements (a check that cannot fail proves nothing)."""
    bad = tmp_path / "x.py"
    bad.write_text("from keytrio.actors.verifier import app\nimport trio\nfrom protocol import quote\n")
    mods = [m for _, m in _imports(bad)]
    assert mods == ["keytrio.actors.verifier", "trio", "protocol"]


# --- no import circles -------------------------------------------------------------------------------

#: packages whose modules may not import each other in a circle, not even under TYPE_CHECKING or
#: inside a function (a circle is two rooms that cannot be read, or changed, one without the other)
NO_CIRCLES = ("actors/verifier", "actors/common", "actors/registrar")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("keytrio", *parts))


def _import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """module -> the modules of ``paths`` it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    known = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
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


@pytest.mark.parametrize("package", NO_CIRCLES)
def test_no_import_circles(package: str):
    circles = _circles(_import_graph(_sources(package)))
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_sees_a_circle():
    """Two modules that import each other (one only under TYPE_CHECKING) form a circle."""
    graph = {"keytrio.a": {"keytrio.b"}, "keytrio.b": {"keytrio.a"}, "keytrio.c": {"keytrio.a"}}
    assert _circles(graph) == [["keytrio.a", "keytrio.b"]]
