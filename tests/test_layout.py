"""The package's shape: no import circle between SHALA's modules."""

import ast
from pathlib import Path

SHALA = Path(__file__).resolve().parents[1] / "shala"


def _module(path: Path) -> str:
    parts = path.relative_to(SHALA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """``{module: {shala modules it imports, at any depth of its code}}``."""
    modules = {_module(p): p for p in SHALA.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_circle():
    graph = import_graph()
    done, path = set(), []

    def visit(node):
        if node in path:
            cycle = path[path.index(node):] + [node]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)
    assert "shala.train" in graph and "shala.reference" in graph["shala.label_jsd"]


def test_the_orchestrator_and_every_class_stay_small():
    assert len((SHALA / "train.py").read_text().splitlines()) <= 250
    big = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in SHALA.rglob("*.py")
           for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)
           and n.end_lineno - n.lineno + 1 > 200]
    assert not big


def test_only_rollout_py_tells_the_forms_apart():
    """Elsewhere a form is used through its interface and class attributes, never by its name."""
    from shala.rollout import FORMS

    names = set(FORMS)
    found = []
    for path in SHALA.rglob("*.py"):
        if path.name == "rollout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in names
                                                     for c in [node.left, *node.comparators]):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, "the rollout form compared by name in " + ", ".join(found)


def test_no_top_level_folder_shadows_an_installed_package():
    """``python -m`` from the repository root puts the root first on ``sys.path``: a package folder
    there named like an installed one is imported in its place (transformers imports the hub's
    ``kernels``, and a ``kernels/`` folder here broke every model load)."""
    import importlib.metadata

    root = SHALA.parent
    installed = importlib.metadata.packages_distributions()
    ours = {p.parent.name for p in root.glob("*/__init__.py")}
    clash = {name: installed[name] for name in ours - {"shala"} if name in installed}
    assert not clash, f"top-level folders of {root} named like installed packages: {clash}"
    assert "kernels" not in ours
