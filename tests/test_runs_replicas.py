"""mmgcs.runs.replicas: a collective step gives every process one outcome (a write failure becomes the caller's
message, a TrainingError is shared, any other error is re-raised as itself), and processes whose weights differ
after an epoch are stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmgcs.digest import tensors_digest
from mmgcs.runs import failures, replicas
from mmgcs.testing import tiny_model


class OneProcess:
    num_processes = 1


def test_a_collective_step_returns_its_value_or_one_error():
    assert replicas.collective(OneProcess(), lambda: 42) == 42

    def refused():
        raise failures.TrainingError("the folder is in use")

    with pytest.raises(failures.TrainingError, match="^the folder is in use$"):
        replicas.collective(OneProcess(), refused)

    def full():
        raise OSError(28, "No space left on device")

    with pytest.raises(failures.TrainingError, match="Could not save the model in /nowhere: the disk is full"):
        replicas.collective(OneProcess(), full, failures.save_failed("the model", Path("/nowhere")))


@pytest.mark.parametrize("error", [RuntimeError("size mismatch for head.weight"), ValueError("a bug"), KeyError("x")])
def test_other_errors_in_a_collective_step_are_not_called_a_failed_save(error):
    def step():
        raise error

    assert failures.write_failure(error) is None
    with pytest.raises(type(error)):
        replicas.collective(OneProcess(), step, failures.save_failed("the model", Path("/nowhere")))


def test_processes_holding_different_weights_are_stopped(monkeypatch):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    # What gather_object would bring back from a second process holding `twin`: its digest beside ours.
    for twin, in_sync in ((tiny_model(seed=0), True), (other, False)):
        monkeypatch.setattr(replicas, "gather_object", lambda ours, twin=twin: [*ours, tensors_digest(twin.state_dict())])
        if in_sync:
            assert replicas.replicas_in_sync(OneProcess(), model) is True
        else:
            with pytest.raises(failures.TrainingError, match="The 2 processes hold different weights after an epoch"):
                replicas.replicas_in_sync(OneProcess(), model)
