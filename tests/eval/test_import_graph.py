"""moeut.eval's modules import each other in one direction: the order a task walks through them.

Run as a script to print the graph: ``python tests/eval/test_import_graph.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moeut.eval

EVAL_DIR = Path(moeut.eval.__file__).parent

# The walk of a zero-shot task, bottom first: a module may import only modules listed before it.
# encoding is the tokenizer wrapper every step uses; perplexity is the ppl task; evaluate drives them all.
# harness_data / harness are the lm-eval adapter, beside the walk; the task YAMLs reach harness_data through
# a moeut_data.py in each of their folders (lm-eval resolves ``!function`` beside the YAML).
ORDER = ["encoding", "files", "examples", "candidates", "scoring", "aggregate", "perplexity", "evaluate",
         "harness_data", "harness", "harness_tasks.moeut_data", "harness_tasks.blimp.moeut_data"]
# the package's __init__ (re-exports) is above the library; the command lives in moeut.cli.evaluate
ABOVE = {"__init__"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(EVAL_DIR).with_suffix("").parts)


def eval_imports(path: Path) -> dict[str, bool]:
    """moeut.eval modules that ``path`` imports → whether every such import is at the module's top level
    (anywhere outside a function or class body, a ``try`` included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested |= {id(n) for n in ast.walk(node) if n is not node}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "moeut.eval" else [f"moeut.eval.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("moeut.eval."):
                target = name[len("moeut.eval."):]
                out[target] = out.get(target, True) and id(node) not in nested
    return out


def import_graph() -> dict[str, dict[str, bool]]:
    return {module_name(p): eval_imports(p) for p in sorted(EVAL_DIR.rglob("*.py"))}


def test_every_module_has_its_place_in_the_walk():
    assert set(import_graph()) == set(ORDER) | ABOVE


def test_imports_follow_the_walk_and_form_no_cycle():
    graph = import_graph()
    for mod in ORDER:
        for target in graph[mod]:
            assert target in ORDER, f"{mod} imports moeut.eval.{target}, which is not a module of the walk"
            assert ORDER.index(target) < ORDER.index(mod), \
                f"{mod} imports moeut.eval.{target}, a later step ({' → '.join(ORDER)})"
    # and independently of ORDER: a depth-first search finds no cycle among the library modules
    state: dict[str, str] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for target in graph.get(mod, {}):
            if target in ABOVE:
                continue
            assert state.get(target) != "open", "import cycle: " + " → ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[mod] = "done"

    for mod in ORDER:
        if mod not in state:
            visit(mod, [mod])


def test_imports_between_eval_modules_sit_at_module_top_level():
    for mod, targets in import_graph().items():
        inside = [t for t, top in targets.items() if not top]
        assert not inside, f"moeut.eval.{mod} imports {inside} inside a function"


def test_each_step_builds_on_the_one_before_and_evaluate_drives_them():
    graph = import_graph()
    steps = ["files", "examples", "candidates", "scoring", "aggregate"]
    for before, after in zip(steps, steps[1:]):
        assert before in graph[after], f"{after} does not build on {before}"
    assert {"files", "examples", "scoring", "aggregate", "perplexity"} <= set(graph["evaluate"])


def test_the_graph_sees_an_import_inside_a_function(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from moeut.eval.files import TASKS\n\ndef f():\n    from moeut.eval.scoring import x\n"
                   "    import moeut.eval.aggregate\n\ntry:\n    from moeut.eval import examples\nexcept ImportError:\n"
                   "    pass\n")
    assert eval_imports(src) == {"files": True, "scoring": False, "aggregate": False, "examples": True}


if __name__ == "__main__":
    graph = import_graph()
    for mod in ORDER + sorted(ABOVE):
        targets = sorted(graph[mod], key=lambda t: ORDER.index(t) if t in ORDER else len(ORDER))
        print(f"{mod:<26} → " + (", ".join(t + ("" if graph[mod][t] else " (in a function)") for t in targets)
                                 or "(nothing in moeut.eval)"))
