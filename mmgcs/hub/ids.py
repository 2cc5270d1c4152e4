"""Hub repo ids: the one rule that tells an id (`owner/name`) from a local folder name."""

from pathlib import Path
from typing import Union

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


def default_bundle_dir(repo_id: str) -> Path:
    """Where `push_to_hub` saves a bundle when no folder is given: `./mmgcs-bundles/<owner>--<name>`."""
    return Path("mmgcs-bundles") / repo_id.replace("/", "--")


__all__ = ["default_bundle_dir", "is_hub_id"]
