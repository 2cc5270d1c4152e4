"""The layering drawn in ARCHITECTURE.md, enforced: every import of every module of the library, the app and the
training scripts (function-local ones included) goes to its own layer or a lower one, no modules import each other
around a circle, and a function-local import is one of the few listed in ARCHITECTURE.md (an optional heavy
dependency kept off the import path).

A package `__init__` that re-exports lazily (`mmgcs.lazy.lazy_exports(package, globals(), TABLE)`) names its
modules as strings, which no import statement shows: each module of such a table counts as an import by the
package, so an upward or circular arrow through a lazy table fails like any other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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


def _is_lazy_exports(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    return isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "lazy_exports"


def _literal_table(node: ast.AST, where: str) -> dict[str, str]:
    """A lazy table's {name: module}: a dict literal whose `**` entries are dict literals or
    `dict.fromkeys((names...), "module")` — the spellings the package `__init__` files use."""
    if isinstance(node, ast.Dict):
        table: dict[str, str] = {}
        for key, value in zip(node.keys, node.values):
            entry = {ast.literal_eval(key): ast.literal_eval(value)} if key is not None else None
            table.update(_literal_table(value, where) if entry is None else entry)
        return table
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "dict.fromkeys" and len(node.args) == 2:
        return dict.fromkeys(ast.literal_eval(node.args[0]), ast.literal_eval(node.args[1]))
    raise AssertionError(f"{where}:{node.lineno}: a lazy re-export table the layering test cannot read "
                         f"({ast.unparse(node)[:60]}): write it as a dict literal (`**dict.fromkeys(names, module)` "
                         "entries allowed)")


def lazy_tables(tree: ast.Module, where: str) -> list[tuple[str, str, int]]:
    """(exported name, module, line of the `lazy_exports` call) for every entry of every lazy table of a file;
    the table is the call's third argument, inline or a name assigned at the module's top level."""
    assigned = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    found = []
    for call in (n for n in ast.walk(tree) if _is_lazy_exports(n)):
        arg = call.args[2] if len(call.args) > 2 else next((k.value for k in call.keywords if k.arg == "table"), None)
        if isinstance(arg, ast.Name):
            if arg.id not in assigned:
                raise AssertionError(f"{where}:{call.lineno}: lazy table {arg.id} is not assigned at the top level")
            arg = assigned[arg.id]
        if arg is None:
            raise AssertionError(f"{where}:{call.lineno}: lazy_exports without a table")
        found += [(name, module, call.lineno) for name, module in _literal_table(arg, where).items()]
    return found


def lazy_edges(tree: ast.Module, where: str) -> list[tuple[str, str, int, bool]]:
    """The arrows of a file's lazy tables, one per module named, as (file, module file, line, local=False)."""
    edges = []
    for _, module, line in lazy_tables(tree, where):
        target = module_file(module)
        assert target, f"{where}:{line}: lazy table names {module!r}, which is no module of mmgcs"
        if (where, target, line, False) not in edges:
            edges.append((where, target, line, False))
    return edges


def internal_edges() -> list[tuple[str, str, int, bool]]:
    """Every arrow between the repo's modules: import statements, and the modules named by lazy tables."""
    edges = []
    for path in sources():
        for name, line, local, _ in imports(path):
            target = module_file(name)
            if target and target != rel(path):
                edges.append((rel(path), target, line, local))
        edges += lazy_edges(ast.parse(path.read_text(encoding="utf-8")), rel(path))
    return edges


def upward_edges(edges, layers: dict[str, int]) -> list[str]:
    return [
        f"{src}:{line} imports {dst} (layer {layer_of(src, layers)} -> {layer_of(dst, layers)})"
        for src, dst, line, _ in edges
        if dst != TOP and layer_of(dst, layers) > layer_of(src, layers)
    ]


def import_circles(edges) -> list[set[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges:
        if dst != TOP:
            graph.setdefault(src, set()).add(dst)
    return [c for c in _strongly_connected(graph) if len(c) > 1]


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
    upward = upward_edges(internal_edges(), layer_map())
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circles():
    circles = import_circles(internal_edges())
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


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_lazy_tables_are_read_and_name_what_their_modules_define():
    """Every file calling lazy_exports has a table the walk reads, and each entry's module defines the name (a
    wrong module is an AttributeError only on first use, which no import statement would show)."""
    callers = [p for p in sources() if "lazy_exports(" in p.read_text(encoding="utf-8") and rel(p) != "mmgcs/lazy.py"]
    assert {"mmgcs/__init__.py", "mmgcs/hub/__init__.py", "mmgcs/runs/__init__.py"} <= {rel(p) for p in callers}
    wrong = []
    for path in callers:
        entries = lazy_tables(ast.parse(path.read_text(encoding="utf-8")), rel(path))
        assert entries, f"{rel(path)} calls lazy_exports but the layering test reads no table there"
        for name, module, line in entries:
            target = module_file(module)
            assert target, f"{rel(path)}:{line}: lazy table names {module!r}, which is no module of mmgcs"
            if name not in _top_level_names(ast.parse((REPO / target).read_text(encoding="utf-8"))):
                wrong.append(f"{rel(path)}:{line}: {name} is not defined in {module}")
    assert not wrong, "lazy re-exports naming the wrong module:\n" + "\n".join(wrong)


def test_the_checker_sees_an_upward_or_circular_lazy_table():
    """A lazy table is an import: a layer-1 package re-exporting a layer-7 module is upward, and a package whose
    table names a module that imports the package back is a circle — neither shows as an import statement."""
    layers = layer_map()
    code = ('from mmgcs.lazy import lazy_exports\n'
            '_LAZY = {"x": "mmgcs.data.images", **dict.fromkeys(("run", "fit"), "mmgcs.engine")}\n'
            '__getattr__ = lazy_exports("mmgcs.data", globals(), _LAZY)\n')
    tree = ast.parse(code)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "mmgcs.engine"]
    assert lazy_tables(tree, "mmgcs/data/__init__.py") == [
        ("x", "mmgcs.data.images", 3), ("run", "mmgcs.engine", 3), ("fit", "mmgcs.engine", 3)]
    edges = lazy_edges(tree, "mmgcs/data/__init__.py")
    assert upward_edges(edges, layers) == ["mmgcs/data/__init__.py:3 imports mmgcs/engine.py (layer 1 -> 7)"]
    back = [("mmgcs/data/images.py", "mmgcs/data/__init__.py", 1, False)]
    assert import_circles(edges + back) == [{"mmgcs/data/__init__.py", "mmgcs/data/images.py"}]
    assert import_circles(edges) == []
    inline = ast.parse('__getattr__ = lazy_exports("p", globals(), {"y": "mmgcs.cli"})\n')
    assert upward_edges(lazy_edges(inline, "mmgcs/hub/__init__.py"), layers) == [
        "mmgcs/hub/__init__.py:1 imports mmgcs/cli.py (layer 3 -> 8)"]
    with pytest.raises(AssertionError, match="cannot read"):
        lazy_tables(ast.parse('lazy_exports("p", globals(), make_table())\n'), "mmgcs/x/__init__.py")
