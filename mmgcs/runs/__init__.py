"""The run folder's safety net: one run per folder, writes that fail clearly, saves that survive a kill, and
checkpoints that are verified before anything uses them. Each job in one file:

- `lock.py`: `RunLock` (one run per `train.output_dir`; a dead process's lock taken over) and `take_run_folder`;
- `swap.py`: `write_json_atomic` and the bundle swap (`replace_folder`, `recover_folder` after a kill);
- `checkpoints.py`: `checkpoints/epoch_NNN` saved collectively, verified and chosen on --resume;
- `manifest.py`: the digests of a checkpoint's files (`MANIFEST.json`, written last);
- `frozen.py`: checkpoints without the frozen towers' weights (accelerate's save/load hooks, their digest);
- `folder.py`: the folder from start to finish (settings saved and compared on --resume, `COMPLETE` written last);
- `replicas.py`: steps every process takes together (one error for all) and the same-weights check;
- `failures.py`: `TrainingError` and the message of a failed write (full disk, permissions).

The loop's own state (`LoopState`, early stopping) lives beside the engine (`mmgcs.loop_state`), the push of a
finished run in `mmgcs.hub.push`, the digests in `mmgcs.digest`. `TrainingError` loads at once; every other name
loads its module on first use.
"""

from mmgcs.lazy import lazy_exports
from mmgcs.runs.failures import TrainingError

_LAZY = {
    **dict.fromkeys(("not_writable", "save_failed", "write_failure"), "mmgcs.runs.failures"),
    **dict.fromkeys(("recover_folder", "replace_folder", "write_json_atomic"), "mmgcs.runs.swap"),
    **dict.fromkeys(("collective", "replicas_in_sync"), "mmgcs.runs.replicas"),
    **dict.fromkeys(("LOCK_FILE", "RunLock", "take_run_folder"), "mmgcs.runs.lock"),
    **dict.fromkeys(("MANIFEST", "MANIFEST_FORMAT", "manifest_problem", "write_manifest"), "mmgcs.runs.manifest"),
    **dict.fromkeys(("CHECKPOINT_WEIGHTS", "FROZEN_FILE", "FROZEN_FORMAT", "check_frozen_weights", "frozen_names",
                     "frozen_problem", "leave_out_frozen", "load_frozen", "load_without_frozen"), "mmgcs.runs.frozen"),
    **dict.fromkeys(("STATE_FILE", "check_fresh_folder", "checkpoint_dirs", "checkpoint_epoch", "checkpoint_problem",
                     "choose_checkpoint", "latest_checkpoint", "load_checkpoint", "pick_checkpoint", "rng_problem",
                     "save_checkpoint", "state_problem"), "mmgcs.runs.checkpoints"),
    **dict.fromkeys(("COMPLETE", "RESUMABLE_CHANGES", "check_resumed_config", "flatten_dict", "load_bundle_weights",
                     "mark_complete", "mark_incomplete", "start_run_folder"), "mmgcs.runs.folder"),
}

__getattr__ = lazy_exports("mmgcs.runs", globals(), _LAZY)


__all__ = ["TrainingError", *sorted(_LAZY)]
