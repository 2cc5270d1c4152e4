"""tests/ mirrors the package (issue 22): every module of the library (and the Space's app.py) has a direct test
file named after it, every test file names the module it tests or is one of the few suites about the whole
product, and no test skips because a module of the project fails to import (an import error must fail).

The naming rule. A module `mmgcs/<area>/<module>.py` is tested by `tests/test_<area>_<module>.py` or
`tests/test_<module>.py`, either with an `_<aspect>` suffix (`test_data_build.py`, `test_runs_lock.py`,
`test_engine_resume.py`, `test_bundle_checks_json.py`); a top-level `mmgcs/<module>.py` by `test_<module>[_<aspect>]`.
A package `__init__.py` that defines a function or class (not only re-exports) is a module named after its
package (`mmgcs/resources/__init__.py` -> `test_resources.py`). A test file belongs to the module whose name it
matches longest (`test_bundle_checks_json.py` is bundle_checks', not hub/bundle's); a file whose longest match is
the same bare name in two folders (`test_image_prefix.py`: features/ or models/?) is ambiguous and must say its
area."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmgcs"
TESTS = REPO / "tests"

# Modules with no direct test file, each with why none can exist. Keep this short: a module that can be called can
# be tested.
NO_DIRECT_TEST = {
    # The tiny backbones and models every other test builds (tiny_model, tiny_text_backbone_dir): a fault there
    # fails most of the suite at once, and a test of its own would only rebuild what those tests already check.
    "testing": "exercised by nearly every test file",
}

# Test files named after no module (whole-product suites), each with why.
NOT_ABOUT_ONE_MODULE = {
    "test_layering.py": "the import layers of every module (ARCHITECTURE.md)",
    "test_test_layout.py": "this file: the layout of tests/ itself",
    "test_no_network.py": "a training run, `mmgcs predict` and the app, each in a sandbox that fails on any network "
                          "use: a guarantee of the product, not of one module",
    "test_browser.py": "the Space page in a real headless browser (app.py, gradio and the JavaScript together)",
    "test_ddp.py": "data-parallel training under `accelerate launch` (engine, loaders, runs together)",
    "test_multinode.py": "two machines under `accelerate launch` on one box (engine, loaders, runs together)",
    "test_makefile_demo.py": "the Makefile's `make demo` / `make train` away from the data",
    "test_makefile_train.py": "the Makefile's `make train` deciding on the run's COMPLETE marker",
    "test_bench_quality.py": "benchmarks/bench_quality.py (a kept tool, not a module of the package)",
}


def package_modules() -> dict[str, Path]:
    """'data/build' -> mmgcs/data/build.py, 'resources' -> mmgcs/resources/__init__.py, and 'app' -> app.py."""
    found = {"app": REPO / "app.py"}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or path.stem == "__main__":
            continue
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if path.stem == "__init__":
            tree = ast.parse(path.read_text(encoding="utf-8"))
            defines = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)
            if not defines or len(parts) == 1:  # re-exports only, or the top package's lazy table
                continue
            parts = parts[:-1]
        found["/".join(parts)] = path
    return found


def names_for(module: str) -> tuple[str, ...]:
    """The names a test file of `module` may carry after `test_`: area-qualified, and bare."""
    parts = module.split("/")
    return tuple(dict.fromkeys(["_".join(parts), parts[-1]]))


def folder(module: str, modules: dict[str, Path]) -> Path:
    return modules[module].parent  # a package's __init__ shares its folder with the package's modules


def owners(stem: str, modules: dict[str, Path]) -> list[str]:
    """The modules the test file `stem` (without `test_`) belongs to: those it matches by their longest name."""
    matches = {}
    for module in modules:
        for name in names_for(module):
            if stem == name or stem.startswith(name + "_"):
                matches[module] = max(matches.get(module, 0), len(name))
    if not matches:
        return []
    best = max(matches.values())
    return sorted(m for m, n in matches.items() if n == best)


def all_test_files() -> list[str]:
    return sorted(p.name for p in TESTS.glob("test_*.py"))


def test_every_module_has_a_direct_test_file():
    modules = package_modules()
    tested = {m for name in all_test_files() for m in owners(name[len("test_"):-len(".py")], modules)}
    missing = sorted(set(modules) - tested - set(NO_DIRECT_TEST))
    assert not missing, (
        f"modules without a direct test file: {missing}. Add tests/test_<area>_<module>.py (or test_<module>.py) "
        "testing its public behaviour, or rename the file that tests it so its name says so"
    )


def test_each_allow_list_entry_is_still_needed_and_true():
    modules = package_modules()
    tested = {m for name in all_test_files() for m in owners(name[len("test_"):-len(".py")], modules)}
    assert set(NO_DIRECT_TEST) <= set(modules), "NO_DIRECT_TEST names a module that is gone"
    stale = set(NO_DIRECT_TEST) & tested
    assert not stale, f"now directly tested, drop from NO_DIRECT_TEST: {stale}"
    for name in NOT_ABOUT_ONE_MODULE:
        assert (TESTS / name).is_file(), f"{name} is gone: drop it here"
        assert not owners(name[len("test_"):-len(".py")], modules), f"{name} is named after a module: drop it here"


def test_every_test_file_names_one_module_or_says_why_not():
    modules = package_modules()
    unnamed, ambiguous = [], []
    for name in all_test_files():
        found = owners(name[len("test_"):-len(".py")], modules)
        if not found and name not in NOT_ABOUT_ONE_MODULE:
            unnamed.append(name)
        if len({folder(m, modules) for m in found}) > 1:
            ambiguous.append(f"{name} -> {found}")
    assert not unnamed, (
        f"test files named after no module: {unnamed}. Name each test_<area>_<module>[_<aspect>].py after the "
        "module it tests (a scenario or issue goes in the aspect or the docstring), or, for a suite about the whole "
        "product, add it to NOT_ABOUT_ONE_MODULE with the reason"
    )
    assert not ambiguous, f"test files whose name fits modules in two folders (add the area): {ambiguous}"


def project_module(name: object) -> bool:
    return isinstance(name, str) and (name == "mmgcs" or name.startswith("mmgcs.") or name.split(".")[0] == "app")


def skipped_imports(path: Path) -> list[str]:
    """`pytest.importorskip` of a project module, and `try: import mmgcs...` whose ImportError is caught: both turn a
    broken module of the project into skipped tests."""
    found = []
    for node in sorted(ast.walk(ast.parse(path.read_text(encoding="utf-8"))), key=lambda n: getattr(n, "lineno", 0)):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "importorskip" and node.args and isinstance(node.args[0], ast.Constant):
                if project_module(node.args[0].value):
                    found.append(f"{path.name}:{node.lineno} importorskip({node.args[0].value!r})")
        elif isinstance(node, ast.Try):
            imports = [n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
            project = [n for n in imports if project_module(getattr(n, "module", None))
                       or any(project_module(a.name) for a in n.names if isinstance(n, ast.Import))]
            caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if project and caught & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"}:
                found.append(f"{path.name}:{node.lineno} try: import ... except ImportError")
    return found


def test_no_test_skips_because_a_project_module_fails_to_import():
    found = [hit for path in sorted(TESTS.glob("*.py")) for hit in skipped_imports(path)]
    assert not found, (
        f"a broken module of the project would skip these tests instead of failing them: {found}. Import it plainly "
        "(importorskip is for optional third-party extras only: gradio, onnxruntime, ...)"
    )


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The rule itself, on names: an unnamed file, a bare name in two folders, a project importorskip."""
    modules = package_modules()
    assert owners("data_build", modules) == ["data/build"]
    assert owners("bundle_checks_json", modules) == ["bundle_checks"]  # not hub/bundle: the longer name wins
    assert owners("runs_frozen", modules) == ["runs/frozen"]
    assert owners("macro_options", modules) == []
    assert owners("image_prefix", modules) == ["features/image_prefix", "models/image_prefix"]
    assert owners("resources", modules) == ["resources"]
    bad = tmp_path / "test_x.py"
    bad.write_text("import pytest\nm = pytest.importorskip('mmgcs.engine')\ngr = pytest.importorskip('gradio')\n"
                   "try:\n    from mmgcs import evaluate\nexcept ImportError:\n    evaluate = None\n")
    assert [hit.split(" ", 1)[1] for hit in skipped_imports(bad)] == [
        "importorskip('mmgcs.engine')", "try: import ... except ImportError"]
