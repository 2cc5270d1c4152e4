"""The layering drawn in ARCHITECTURE.md, enforced: every import of every module of the library, the app and the
training scripts (function-local ones included) goes to its own layer or a lower one, no modules import each other
around a circle, and a function-local import is one of the few listed in ARCHITECTURE.md (an optional heavy
dependency kept off the import path)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "ARCHITECTURE.md"
# Importing any `mmgcs.x` runs the package's __init__, whose names are lazy re-exports for users: an import of
# the top package itself (e.g. for `__version__`) is not an arrow between layers. Subpackages (`mmgcs.hub`) are.
TOP = "mmgcs/__init__.py"


def layer_map() -> dict[str, int]:
    """ARCHITECTURE.md's layer table: `path.py` or `package/` cells → their layer number."""
    layers: dict[str, int] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\|\s*(\d+)\s[^|]*\|([^|]*)\|", line)
        if row:
            for path in re.findall(r"`([\w./*-]+(?:\.py|/))`", row.group(2)):
                layers[path] = int(row.group(1))
    return layers


def sources() -> list[Path]:
    files = [REPO / "app.py", *sorted((REPO / "training").glob("*.py")), *sorted((REPO / "mmgcs").rglob("*.py"))]
    return [f for f in files if "__pycache__" not in f.parts]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def layer_of(path: str, layers: dict[str, int]) -> int:
    if path in layers:
        return layers[path]
    folders = [p for p in layers if p.endswith("/") and path.startswith(p)]
    if folders:
        return layers[max(folders, key=len)]  # the most specific folder
    if path.startswith("training/") and "training/*.py" in layers:
        return layers["training/*.py"]
    raise AssertionError(f"{path} has no layer in ARCHITECTURE.md: add it to the layer table")


def module_file(name: str) -> str | None:
    """`mmgcs.models.text` → 'mmgcs/models/text.py' (or a package's __init__.py); None for other packages."""
    if name != "mmgcs" and not name.startswith("mmgcs."):
        return None
    base = REPO / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return rel(base.with_suffix(".py"))
    if (base / "__init__.py").is_file():
        return rel(base / "__init__.py")
    return None


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _is_local(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module name, line, function-local?, the module it names) for each import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = ".".join(Path(rel(path)).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _in_type_checking(node, parents):
            continue
        local = _is_local(node, parents)
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, local, a.name) for a in node.names]
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        for alias in node.names:  # `from mmgcs import runs` names the submodule when there is one
            sub = f"{base}.{alias.name}"
            found.append((sub if module_file(sub) else base, node.lineno, local, base))
    return found


def internal_edges() -> list[tuple[str, str, int, bool]]:
    edges = []
    for path in sources():
        for name, line, local, _ in imports(path):
            target = module_file(name)
            if target and target != rel(path):
                edges.append((rel(path), target, line, local))
    return edges


def allowed_local_imports() -> set[tuple[str, str]]:
    """ARCHITECTURE.md's list of function-local imports kept: lines `- `file.py`: `module` — why`."""
    text = DOC.read_text(encoding="utf-8").split("## Function-local imports kept", 1)[-1]
    return set(re.findall(r"^- `([\w./-]+\.py)`: `([\w.]+)`", text, flags=re.M))


def test_every_module_has_a_layer():
    layers = layer_map()
    assert layers, "ARCHITECTURE.md has no layer table"
    for path in sources():
        layer_of(rel(path), layers)


def test_no_module_imports_a_higher_layer():
    layers = layer_map()
    upward = [
        f"{src}:{line} imports {dst} (layer {layer_of(src, layers)} -> {layer_of(dst, layers)})"
        for src, dst, line, _ in internal_edges()
        if dst != TOP and layer_of(dst, layers) > layer_of(src, layers)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in internal_edges():
        if dst != TOP:
            graph.setdefault(src, set()).add(dst)
    circles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not circles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a few dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_function_local_imports_are_only_the_listed_optional_dependencies():
    allowed = allowed_local_imports()
    found = sorted({
        f"{rel(path)}:{line} imports {base}"
        for path in sources()
        for name, line, local, base in imports(path)
        if local and not {(rel(path), base), (rel(path), base.split(".")[0])} & allowed
    })
    assert not found, "function-local imports not listed in ARCHITECTURE.md:\n" + "\n".join(found)


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    """The walk itself: a function-local upward import and a two-module circle are found."""
    code = "def f():\n    from mmgcs.engine import run\n"
    tree = ast.parse(code)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _is_local(node, parents)
    assert module_file("mmgcs.engine") == "mmgcs/engine.py"
    assert [len(c) for c in _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) if len(c) > 1] == [2]
