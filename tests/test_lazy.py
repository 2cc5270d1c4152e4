"""mmgcs/lazy.py: a package's names served from their modules on first use, once; an unknown name is the usual
AttributeError; and the packages that use it stay light to import."""

import subprocess
import sys
import types

import pytest

from mmgcs.lazy import lazy_exports


def _package(table):
    pkg = types.ModuleType("fakepkg")
    pkg.__getattr__ = lazy_exports("fakepkg", vars(pkg), table)
    return pkg


def test_a_name_comes_from_its_module_on_first_use_then_is_a_plain_attribute(monkeypatch):
    import importlib
    import json

    pkg = _package({"dumps": "json", "JSONDecodeError": "json"})
    assert "dumps" not in vars(pkg)  # nothing is imported or bound when the package is made
    calls = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name: calls.append(name) or real(name))
    assert pkg.dumps is json.dumps and pkg.JSONDecodeError is json.JSONDecodeError
    assert vars(pkg)["dumps"] is json.dumps  # bound in the namespace: later reads skip __getattr__
    assert pkg.dumps is json.dumps and calls == ["json", "json"]


def test_an_unknown_name_is_an_attribute_error_naming_the_package():
    pkg = _package({"dumps": "json"})
    with pytest.raises(AttributeError, match="module 'fakepkg' has no attribute 'loads'"):
        pkg.loads
    assert not hasattr(pkg, "loads")


def test_a_name_missing_from_its_module_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        _package({"no_such_name": "json"}).no_such_name


def test_the_project_packages_serve_their_lazy_names():
    import mmgcs.hub
    import mmgcs.runs
    from mmgcs.hub import push
    from mmgcs.runs import swap

    assert mmgcs.runs.write_json_atomic is swap.write_json_atomic
    assert mmgcs.hub.push_bundle is push.push_bundle


def test_importing_the_lazy_packages_loads_no_heavy_library():
    code = ("import sys, mmgcs, mmgcs.hub, mmgcs.runs, mmgcs.data; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
