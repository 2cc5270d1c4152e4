"""Hub repo ids (the one rule that tells an id, `owner/name`, from a local folder name) and whether the Hub answers."""

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Union

from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def is_hub_id(name: Union[str, Path]) -> bool:
    """Whether `name` is written like a Hub repo id, `owner/name` (huggingface_hub's own rules).

    Callers look for a local folder first; a bare name (no owner) is not taken as an id, because MMGCS models and
    datasets live in user repos and a bare word is far more often a mistyped local folder.
    """
    if not isinstance(name, str) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the user asked huggingface_hub to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in _TRUE:
        return True
    return bool(hf_constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def _probe_hub(endpoint: str, timeout: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # the server answered: it is reachable
    except (urllib.error.URLError, OSError, ValueError):
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether Hub downloads can work. A short probe, once per process: without it every hub call on an
    offline machine retries for 20-50 s before failing."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe_hub(endpoint, timeout)


def default_bundle_dir(repo_id: str) -> Path:
    """Where `push_to_hub` saves a bundle when no folder is given: `./mmgcs-bundles/<owner>--<name>`."""
    return Path("mmgcs-bundles") / repo_id.replace("/", "--")


__all__ = ["default_bundle_dir", "hub_offline", "hub_reachable", "is_hub_id"]
