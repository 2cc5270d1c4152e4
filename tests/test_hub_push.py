"""mmgcs.hub.push.push_run_bundle: a finished run whose push fails (offline here) says that everything is saved in
its folder and how to push the bundle later; the bundle is left as it was."""

from __future__ import annotations

import pytest

from mmgcs.hub import PushError
from mmgcs.hub.push import push_run_bundle
from mmgcs.testing import tiny_model


def test_a_failed_push_of_a_finished_run_says_everything_is_saved_and_how_to_push_later(tmp_path):
    bundle = tmp_path / "run" / "model"
    tiny_model().save_pretrained(bundle)
    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(PushError) as err:
        push_run_bundle(bundle, "me/genres", tmp_path / "run")
    message = str(err.value)
    assert message.startswith(f"Could not push {bundle} to the Hub repo 'me/genres': HubUnavailableError: ")
    assert f"Everything is saved in {tmp_path / 'run'}" in message
    assert f"`huggingface-cli upload me/genres {bundle} .`" in message
    assert sorted(p.name for p in bundle.iterdir()) == before
