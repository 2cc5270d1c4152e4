"""Upload a built dataset folder to the Hugging Face Hub (a dataset repo)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub

from mmgcs.hub import ids
from mmgcs.hub.errors import PushError  # the one upload-failed error, shared with the model push (re-exported here)


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (if needed) the dataset repo `repo_id` and upload `folder` to it; returns the commit URL.

    Raises `PushError` (the folder is untouched) when the folder is not a built dataset or the upload fails; an
    unreachable Hub is reported at once, not after the client's retries.
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not any((folder / "data").glob("*.parquet")):
        raise PushError(f"{folder} is not a built dataset (no README.md or data/*.parquet). Run `python -m mmgcs.data build` first.")
    later = (f"Nothing is lost: the dataset is complete in {folder}. When the Hub is reachable (unset HF_HUB_OFFLINE, "
             f"log in with `hf auth login`), push it with:\n  python -m mmgcs.data push {folder} {repo_id}")
    if not ids.hub_reachable():  # the probe the model push uses
        raise PushError(f"Cannot push {folder} to the Hub dataset repo {repo_id!r}: the Hugging Face Hub is unreachable "
                        f"(or HF_HUB_OFFLINE is set).\n{later}")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
            commit_message="Upload dataset built with python -m mmgcs.data build",
            # shards of an older build must not survive next to the new ones
            delete_patterns=["data/*.parquet"],
        )
    except Exception as e:  # no token, no permission, a dropped connection: all end the same way for the user
        raise PushError(f"Could not push {folder} to the Hub dataset repo {repo_id!r}: {type(e).__name__}: {e}\n{later}") from e
    return str(getattr(info, "commit_url", info))


__all__ = ["PushError", "push_folder"]
