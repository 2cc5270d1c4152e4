"""A wheel install works without the repository: the card template and the tested pins ship in the package as the
top-level files' exact bytes, and `mmgcs serve` finds the Space's app.py only in an editable checkout or the
current folder, saying what to do otherwise. The wheel is built from a copy of the sources and unpacked into a
folder put first on PYTHONPATH (what pip would install, without a virtual environment), run from a folder that is
not the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine_helpers import REPO_ROOT
from mmgcs import doctor, resources

SHIPPED = ("model_card.md", "requirements.txt")  # top-level file -> mmgcs/resources/<same name> in the wheel

# Run inside the unpacked wheel: everything the package reads of its own files, as JSON.
PROBE = """
import contextlib, io, json, sys
from pathlib import Path
import mmgcs
from mmgcs import cli, doctor, resources
from mmgcs.config import ModelConfig
from mmgcs.hub import card
err = io.StringIO()
with contextlib.redirect_stderr(err):
    serve_rc = cli.main(["serve"])
space = Path(sys.argv[1])
print(json.dumps({
    "package": mmgcs.__file__,
    "requirements": str(doctor.REQUIREMENTS),
    "checks": [[c.name, c.status, c.value] for c in doctor.dependency_checks()],
    "template": str(card.TEMPLATE),
    "card": card.render_model_card(ModelConfig(labels=["Action", "Drama"])),
    "editable": str(resources.editable_checkout()),
    "serve_rc": serve_rc, "serve_err": err.getvalue(),
    "space_app": str(resources.space_app(space)),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources, and other work shares the tree.
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO_ROOT / "mmgcs", source / "mmgcs", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", *SHIPPED):
        shutil.copy(REPO_ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    (built,) = tmp.glob("mmgcs-*.whl")
    return built


def test_the_wheel_ships_the_top_level_files_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as whl:
        for name in SHIPPED:
            assert whl.read(f"mmgcs/resources/{name}") == (REPO_ROOT / name).read_bytes(), name
        assert "app.py" not in {Path(n).name for n in whl.namelist()}  # the page is the repository's, not shipped


def test_the_checkout_reads_the_top_level_files_through_the_package():
    # One copy to edit: in the repository the package's files are links to the top-level ones.
    for name in SHIPPED:
        assert resources.resource_path(name).resolve() == (REPO_ROOT / name).resolve()


@pytest.mark.timeout(120)
def test_a_wheel_install_has_its_card_template_and_pins_and_says_where_serve_runs(wheel, tmp_path):
    site, elsewhere, space = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "space"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    space.mkdir()
    (space / "app.py").write_text("print('the page')\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", PROBE, str(space)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(got["package"]).is_relative_to(site)  # the unpacked wheel, not the editable checkout
    assert Path(got["requirements"]).is_relative_to(site) and Path(got["template"]).is_relative_to(site)
    pins = [name for name, _ in doctor.pinned_requirements(REPO_ROOT / "requirements.txt")]
    assert len(pins) > 10 and [name for name, _, _ in got["checks"]] == pins  # no "requirements.txt not found"
    # The template's own sections, filled (the fallback without a template has neither).
    assert "## Limitations" in got["card"] and "over 2 genres: Action, Drama" in got["card"]

    assert got["editable"] == "None"  # pip records no source folder for a wheel
    assert got["serve_rc"] == 2
    assert "app.py not found" in got["serve_err"] and "pip install -e ." in got["serve_err"]
    assert "cd there" in got["serve_err"]
    assert got["space_app"] == str((space / "app.py").resolve())  # a Space's folder (or a clone) as the cwd
