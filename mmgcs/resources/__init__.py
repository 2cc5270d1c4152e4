"""The files the library reads that are not code, found without reaching outside the package.

`model_card.md` (the template of every bundle's card) and `requirements.txt` (the tested pins `mmgcs doctor`
compares) are package data: here they are links to the repository's top-level files, which stay the one copy to
edit; building a wheel copies the linked bytes into it (tests/test_resources.py checks a built wheel against
the top-level files). The Space's page, app.py, is not package data: a Space runs the repository's top-level
app.py, so `space_app` finds that file in a checkout and never guesses a path beside an installed package.
"""

from __future__ import annotations

import importlib.metadata
import json
from importlib.resources import files
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

SPACE_APP = "app.py"


def resource_path(name: str) -> Path:
    """A file shipped in this package, as a path (pip installs a wheel as files, never as a zip)."""
    return Path(str(files(__name__).joinpath(name)))


def editable_checkout(distribution: str = "mmgcs") -> Optional[Path]:
    """The source folder an editable install (`pip install -e .`) was made from, as pip recorded it (PEP 610's
    direct_url.json); None for a wheel install or when the package is not installed."""
    try:
        record = importlib.metadata.distribution(distribution).read_text("direct_url.json")
        info = json.loads(record) if record else {}
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    url = urlparse(info.get("url", ""))
    if not (info.get("dir_info") or {}).get("editable") or url.scheme != "file":
        return None
    return Path(unquote(url.path))


def space_app(cwd: Optional[Path] = None) -> Optional[Path]:
    """The Space's app.py `mmgcs serve` runs: the editable checkout's (the page that matches the installed code),
    else the current folder's (a clone or a Space's folder); None when neither has one."""
    for folder in (editable_checkout(), Path.cwd() if cwd is None else cwd):
        if folder is not None and (folder / SPACE_APP).is_file():
            return (folder / SPACE_APP).resolve()
    return None


SERVE_REMEDY = ("`mmgcs serve` runs the Space's page, the repository's top-level app.py, which a wheel install does "
                "not carry: run it inside a clone of the MMGCS repository or a Space's folder (cd there first; "
                "`python app.py` there is the same), or install the clone with `pip install -e .`.")

__all__ = ["SERVE_REMEDY", "SPACE_APP", "editable_checkout", "resource_path", "space_app"]
