"""The house's import contract: rooms are layered, data flows one way, nothing imports in a circle.

The graph is read from the source (``ast``), counting imports inside functions and under
``TYPE_CHECKING`` too, so a cycle cannot hide behind a function-local import.

Layers, lowest first; a package may import only packages of a lower layer (and itself):

- ``common``: error types and untrusted-input checks
- ``config``: settings
- ``avatars``: the avatar files, registry, registration and face analysis
- ``face``: rendering a face: idle timeline, eye and mouth rigs, renderer, loaded-avatar library
- ``media_tracks``: media clock, compositor, frames ahead, tracks, encoders
- ``pipeline``: speech, listening, lip-sync engines, render jobs
- ``rtc_server``: HTTP, sessions, the conversation, operations
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["common", "config", "avatars", "face", "media_tracks", "pipeline", "rtc_server"]
MAX_LINES = 600
LONG_MARK = "honestly long"  # a module over MAX_LINES says why in its docstring


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in LAYERS:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _targets(mod: str, node: ast.Import | ast.ImportFrom, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    return [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(mod, node, path.name == "__init__.py"):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    for mod in mods:
        graph.setdefault(mod, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    bad = []
    for mod, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = mod.split(".")[0], target.split(".")[0]
            if rank[b] > rank[a]:
                bad.append(f"{mod} -> {target} ({a} is below {b})")
    return bad


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_package_imports_a_package_above_it():
    assert upward_imports(import_graph()) == []


def test_nothing_but_the_entry_point_imports_the_app_module():
    importers = sorted(m for m, t in import_graph().items() if "rtc_server.app" in t)
    assert importers == ["rtc_server.__main__"]


def test_modules_are_short_or_say_why_not():
    long = []
    for mod, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and LONG_MARK not in doc:
            long.append(f"{mod}: {lines} lines")
    assert long == []


# The checks above must be able to fail: they are run on small graphs with known faults.


def test_the_cycle_finder_finds_a_cycle_hidden_three_deep():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_an_upward_import_is_named():
    graph = {"face.renderer": {"media_tracks.clock"}, "media_tracks.clock": set()}
    assert upward_imports(graph) == [
        "face.renderer -> media_tracks.clock (face is below media_tracks)"
    ]


def test_a_function_local_import_counts(tmp_path, monkeypatch):
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "face" / "x.py").write_text("def f():\n    from media_tracks import y\n")
    (tmp_path / "media_tracks" / "y.py").write_text("from ..face import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["face.x"] == {"media_tracks.y"}
    assert graph["media_tracks.y"] == {"face.x"}
    assert cycles(graph) == [["face.x", "media_tracks.y"]]


@pytest.mark.parametrize("pkg", LAYERS)
def test_each_room_says_what_it_is_for(pkg):
    doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc) > 40
