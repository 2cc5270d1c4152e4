"""mmgcs.loop_state: the best epoch and early stopping's count (a missing or NaN metric is the worst), when a run
stops, and the state a checkpoint saves coming back as it was (also after the state check of mmgcs.runs)."""

from __future__ import annotations

import logging
import math

import pytest

from mmgcs.loop_state import LoopState
from mmgcs.runs.checkpoints import STATE_FILE, state_problem
from mmgcs.runs.swap import write_json_atomic


@pytest.mark.parametrize("higher, values, best, best_epoch, bad", [
    (True, [0.5, 0.7, 0.6, 0.65], 0.7, 2, 2),
    (False, [0.5, 0.7, 0.4, 0.45], 0.4, 3, 1),
    (True, [0.5, None, math.nan, 0.5], 0.5, 1, 3),  # a tie is no improvement; None/NaN never are
    (False, [math.nan, 0.9], 0.9, 2, 0),  # a NaN first epoch counts as the worst, so any number beats it
])
def test_the_best_epoch_and_the_epochs_since(higher, values, best, best_epoch, bad):
    state = LoopState()
    improved = [state.track_best(v, epoch, higher) for epoch, v in enumerate(values, 1)]
    assert improved[0] is True
    assert (state.best_metric, state.best_epoch, state.bad_epochs) == (best, best_epoch, bad)


def test_a_run_stops_on_its_step_budget_or_its_patience(caplog):
    state = LoopState(global_step=10, bad_epochs=2)
    with caplog.at_level(logging.INFO, logger="mmgcs.runs"):
        assert not state.should_stop(max_steps=0, patience=3, metric="micro_f1")
        assert not state.should_stop(max_steps=11, patience=0, metric="micro_f1")
        assert state.should_stop(max_steps=10, patience=0, metric="micro_f1")
        assert state.should_stop(max_steps=0, patience=2, metric="micro_f1")
    assert "Reached train.max_steps=10" in caplog.text
    assert "Early stopping: no micro_f1 improvement for 2 epochs" in caplog.text


def test_the_saved_state_comes_back_and_passes_the_checkpoint_check(tmp_path, caplog):
    state = LoopState()
    for epoch, value in enumerate([0.5, 0.6, 0.55], 1):
        state.global_step = 4 * epoch
        state.history.append({"epoch": epoch, "step": state.global_step, "val_micro_f1": value})
        state.track_best(value, epoch, higher=True)
    folder = tmp_path / "epoch_003"
    folder.mkdir()
    write_json_atomic(folder / STATE_FILE, state.to_json(3, 5, "micro_f1"))
    assert state_problem(folder) is None
    loaded, done = LoopState.from_checkpoint(folder)
    assert (loaded, done) == (state, 3)
    with caplog.at_level(logging.INFO, logger="mmgcs.runs"):
        assert loaded.resumed_at(done, epochs=5, patience=3, folder=folder) == 3
        assert loaded.resumed_at(done, epochs=5, patience=1, folder=folder) == 5  # it had stopped early
        assert loaded.resumed_at(5, epochs=5, patience=0, folder=folder) == 5
    assert f"Resumed from {folder} (epoch 3 done, best 0.6 at epoch 2)" in caplog.text
    assert "already finished its 5 epochs" in caplog.text
