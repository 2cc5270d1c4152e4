"""Uploading a saved bundle to a Hub model repo (a bundle folder, a model, a finished run's bundle); offline, a clear
error saying where the bundle is."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import HfApi

from mmgcs.hub.bundle import BUNDLE_PATTERNS, CONFIG_NAME, WEIGHTS_NAME, read_config
from mmgcs.hub.errors import BundleError, HubUnavailableError, PushError
from mmgcs.hub.ids import default_bundle_dir
from mmgcs.hub.ids import hub_reachable


def push_bundle(folder: Union[str, Path], repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                commit_message: str = "Upload MMGCS genre classifier", **upload_kwargs: Any) -> str:
    """Upload a saved bundle folder to a Hub model repo (created if needed); returns the commit URL.

    Raises `HubUnavailableError` (the bundle stays at `folder`) when the Hub cannot be reached.
    """
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise BundleError(f"{folder} has no {name}: save the model with model.save_pretrained({str(folder)!r}) first")
    read_config(folder)  # never publish a bundle that would not load

    retry = (f"The bundle is saved at {folder.resolve()}; upload it when online with "
             f"`hf upload {repo_id} {folder} --repo-type model` (or huggingface-cli upload), "
             f"or call mmgcs.hub.push_bundle({str(folder)!r}, {repo_id!r}) again")
    if not hub_reachable():
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE is set). {retry}")
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True).repo_id
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                 commit_message=commit_message, allow_patterns=BUNDLE_PATTERNS, **upload_kwargs)
    except OSError as e:  # connection errors
        raise HubUnavailableError(f"Cannot push to {repo_id!r}: {type(e).__name__}: {e}. {retry}") from None
    return str(getattr(info, "commit_url", info))


def push_model(model, repo_id: str, *, save_directory: Union[str, Path, None] = None, private: Optional[bool] = None,
               token: Optional[str] = None, commit_message: str = "Upload MMGCS genre classifier",
               model_card_kwargs: Optional[dict] = None, **kwargs) -> str:
    """`model.push_to_hub`: save the bundle to `save_directory` (default `./mmgcs-bundles/<owner>--<name>`), then
    upload that folder. The save comes first, so an offline push leaves a complete bundle to upload later."""
    folder = Path(save_directory) if save_directory is not None else default_bundle_dir(repo_id)
    model.save_pretrained(folder, repo_id=repo_id, model_card_kwargs=model_card_kwargs)
    if "branch" in kwargs:  # the mixin's name for upload_folder's `revision`
        kwargs["revision"] = kwargs.pop("branch")
    kwargs.pop("config", None)
    return push_bundle(folder, repo_id, token=token, private=private, commit_message=commit_message, **kwargs)


def push_run_bundle(bundle: Path, repo_id: str, output_dir: Path) -> str:
    """Upload a finished run's bundle; a failure says that everything is saved and how to push it later."""
    try:
        return push_bundle(bundle, repo_id)
    except Exception as e:
        raise PushError(
            f"Could not push {bundle} to the Hub repo {repo_id!r}: {type(e).__name__}: {e}. "
            f"Everything is saved in {output_dir}; push it later with "
            f"`huggingface-cli upload {repo_id} {bundle} .` once the Hub is reachable and you are logged in"
        ) from None


__all__ = ["default_bundle_dir", "push_bundle", "push_model", "push_run_bundle"]
