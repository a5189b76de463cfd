"""The package's layering (docs/contributing.md, "How the code is laid out"): no import circle, no module importing a
higher layer, stages never importing each other (a sweep may call ``train``), and imports between moeut's own
modules at the top of the file unless a comment next to the import says why."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# higher number = higher layer; a module may import only modules of a lower layer or its own package
LAYERS = {"cli": 5, "train": 4, "eval": 4, "analysis": 4, "integrations": 4, "run": 3, "model": 2, "ops": 1,
          "data": 1, "errors": 0, "fileio": 0, "settings": 0, "runtime": 0, "report": 0, "version": 0}
STAGES = {"train", "eval", "analysis", "integrations"}
ALLOWED_ACROSS = {("moeut.analysis.sweep", "train")}  # a sweep trains


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "moeut").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _resolve(mods: dict[str, Path], importer: str, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = importer.split(".")
            if mods[importer].name != "__init__.py":
                pkg = pkg[:-1]
            base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for n in names:
        if not n.startswith("moeut"):
            continue
        while n not in mods and "." in n:
            n = n.rsplit(".", 1)[0]
        if n != importer:
            out.append(n)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int, bool]]]:
    """Module → imported moeut modules, and every import as (importer, imported, line, has_reason)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    inner = []
    for name, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _resolve(mods, name, node):
                graph[name].add(target)
                if id(node) not in top:
                    near = lines[max(0, node.lineno - 4):node.end_lineno]
                    inner.append((name, target, node.lineno, any("#" in ln for ln in near)))
    return graph, inner


def _layer(module: str) -> tuple[str, int]:
    part = module.split(".")[1] if "." in module else ""
    return part, LAYERS.get(part, 6)


def test_no_import_circle():
    graph, _ = import_graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, "import circle: " + " → ".join(path + [t])
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_module_imports_a_higher_layer_or_another_stage():
    graph, _ = import_graph()
    bad = []
    for m, targets in graph.items():
        if m == "moeut":  # the package's public names
            continue
        part, layer = _layer(m)
        for t in targets:
            tpart, tlayer = _layer(t)
            if tpart == part:
                continue
            if tlayer > layer or (part in STAGES and tpart in STAGES and (m, tpart) not in ALLOWED_ACROSS):
                bad.append(f"{m} → {t}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_library_code_never_imports_the_command_line():
    graph, _ = import_graph()
    bad = [f"{m} → {t}" for m, ts in graph.items() for t in ts
           if t.startswith("moeut.cli") and not m.startswith("moeut.cli")]
    assert not bad


def test_function_level_imports_of_moeut_modules_say_why():
    _, inner = import_graph()
    silent = [f"{m}:{line} → {t}" for m, t, line, reason in inner if not reason]
    assert not silent, "imports inside functions without a comment saying why: " + ", ".join(silent)
