"""`mmgcs predict` in several processes: `--num-processes N` starts N here, `accelerate launch -m mmgcs predict`
(or torchrun) uses the launcher's. Each process reads the whole input, predicts its share of the rows
(`mmgcs.shards`: blocks of --batch-size dealt in turn) into its own part file beside --out, resumable alone, and
when every part is complete the main process merges them into --out (input order, every row once, atomically) and
removes them. The results are those of one process: the same batches, the same scores.

Each process computes on its share of the machine: threads = cores / processes on this machine (OMP_NUM_THREADS or
MMGCS_NUM_THREADS, when set, win), or its own GPU (`cuda:<local rank>`). Under `accelerate launch` on several
machines, --out must be in a folder every machine sees (the main process merges what the others wrote).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import psutil
import torch
from accelerate import PartialState

from mmgcs import batch_predict
from mmgcs.batch_predict import RunStats, duplicates_warning, load_predictor, output_columns, run_predict, written_ids
from mmgcs.interrupts import Interrupted, stop_on_signals
from mmgcs.runtime import available_cores, launched_threads
from mmgcs.shards import (PartsIncomplete, PartState, Shard, merge_parts, part_path, parts_problem, read_state,
                          remove_parts, state_path, write_state)

# How long the processes of a launched run wait for each other (the slowest part, then the merge): a catalogue
# of millions takes days, and torch's default of 30 minutes would stop the others.
LAUNCHED_WAIT = timedelta(days=30)
STOP_WAIT_S = 60  # after a signal, how long the parts get to close their files before they are killed


def sharded(args) -> bool:
    """Whether this `mmgcs predict` is (part of) a run in several processes."""
    return args.part is not None or args.num_processes != 1 or launched_world_size() > 1


def launched_world_size() -> int:
    """The processes of the job that started this one (`accelerate launch`, torchrun: WORLD_SIZE), 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def main(args, argv: Sequence[str]) -> int:
    """`argv`: the command line's arguments from `predict` on (the processes started here get them)."""
    problem = batch_predict.options_problem(args) or _sharding_problem(args)
    if problem:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process finds it: one says it
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.part is not None:
        index, count = _part(args.part)
        if _user_threads():  # else the OMP_NUM_THREADS that run_local gave it
            torch.set_num_threads(_user_threads())
        return run_part(args, index, count, progress=None if index == 0 else False)
    if launched_world_size() > 1:
        return run_launched(args)
    return run_local(args, argv)


def _sharding_problem(args) -> Optional[str]:
    threads = os.environ.get("MMGCS_NUM_THREADS")
    if threads and not (threads.isdigit() and int(threads) > 0):
        return f"MMGCS_NUM_THREADS={threads!r}: expected a whole number of threads per process"
    if args.part is not None:
        try:
            _part(args.part)
        except ValueError:
            return f"--part {args.part!r}: expected K/N with 0 <= K < N (the part this process predicts)"
        return None
    if args.num_processes < 1:
        return "--num-processes must be at least 1"
    if args.num_processes > 1 and launched_world_size() > 1:
        return ("--num-processes starts processes, and so does the launcher that started this one: pick one (under "
                "accelerate launch, its --num_processes says how many)")
    return None


def _part(text: str) -> tuple[int, int]:
    index, count = (int(x) for x in text.split("/"))
    if not 0 <= index < count:
        raise ValueError(text)
    return index, count


# ------------------------------------------------------------------------------------------------ one part
def run_part(args, index: int, count: int, progress: Optional[bool] = None, device: Optional[str] = None) -> int:
    """Predict part `index` of `count` into its part file and mark it complete; the exit status."""
    if device is None and args.device is None and torch.cuda.is_available():
        device = f"cuda:{index % torch.cuda.device_count()}"
    predictor = load_predictor(args, device)
    if predictor is None:
        return 2
    out, part = Path(args.out), part_path(Path(args.out), index, count)
    try:
        start = sum(written_ids(out, output_columns(predictor.labels, args.by_modality,
                                                    getattr(args, "explain", False))).values()) if args.resume else 0
    except batch_predict.OutputMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = read_state(out, index, count)
    resume = (args.resume and part.is_file() and before is not None
              and (before.start, before.block) == (start, args.batch_size))
    if args.resume and part.exists() and not resume:
        print(f"warning: {part.name} was made against another state of {out.name}: predicted again", file=sys.stderr)
    state = PartState(index, count, start, args.batch_size, startup_seconds=_process_age(), ready_at=time.time())
    if not _saved(out, state):
        return 2
    with stop_on_signals():
        try:
            stats = run_predict(predictor, args, part, resume, Shard(index, count, start, args.batch_size), progress)
        except Interrupted as e:
            print(f"part {index + 1} of {count} stopped ({e}): the rows it wrote are kept in {part}; rerun the same "
                  "command with --resume", file=sys.stderr)
            return e.exit_code
    if stats is None or not _saved(out, _completed(state, stats)):
        return 2
    print(f"part {index + 1} of {count}: {stats.written:,} movies written to {part} ({stats.errors:,} with an error, "
          f"{stats.skipped:,} already there) in {stats.seconds:.1f} s", file=sys.stderr)
    return 0


def _completed(state: PartState, stats: RunStats) -> PartState:
    state.complete, state.rows, state.input_rows = True, stats.skipped + stats.written, stats.input_rows
    state.written, state.errors, state.skipped = stats.written, stats.errors, stats.skipped
    state.seconds, state.duplicate_ids = stats.seconds, stats.duplicate_ids
    state.named_duplicates = stats.named_duplicates
    return state


def _saved(out: Path, state: PartState) -> bool:
    """Write the part's state; False, with the error printed, when it cannot be written."""
    try:
        write_state(out, state)
        return True
    except OSError as e:
        reason = e.strerror or type(e).__name__
        print(f"error: could not write {state_path(out, state.index, state.count)} ({reason}): free space (or fix "
              "the folder's permissions) and rerun the same command with --resume", file=sys.stderr)
        return False


def _process_age() -> float:
    """Seconds since this process started (its imports and the model load: the start-up a part pays)."""
    return max(0.0, time.time() - _process_start())


def _process_start() -> float:
    """When this process started (`time.time()`): a run's time counts its imports too."""
    return psutil.Process().create_time()


# ------------------------------------------------------------------------------------- N processes from here
def run_local(args, argv: Sequence[str]) -> int:
    """Predict part 1 here and the others in `--num-processes` - 1 processes started here; wait; merge."""
    began, out, count = _process_start(), Path(args.out), args.num_processes
    if not _parts_ready(args, count):
        return 2
    if args.overwrite:
        remove_parts(out)
    command, env = [sys.executable, "-m", "mmgcs", *argv], _part_env(count)
    parts = [subprocess.Popen([*command, "--part", f"{i}/{count}", "--no-progress"], env=env) for i in range(1, count)]
    threads = _user_threads() or (None if "OMP_NUM_THREADS" in os.environ else int(env["OMP_NUM_THREADS"]))
    if threads:
        torch.set_num_threads(threads)  # this process is part 1: its share of the cores too
    codes = [run_part(args, 0, count)]
    with stop_on_signals():
        try:
            if codes[0] > 128:  # part 1 was stopped by a signal (which reached this process only: pass it on)
                raise Interrupted(codes[0] - 128)
            codes += [p.wait() for p in parts]
        except Interrupted as e:
            _stop(parts)
            print(f"interrupted ({e}): each part keeps the rows it wrote beside {out}; rerun the same command with "
                  "--resume to finish them and merge", file=sys.stderr)
            return e.exit_code
    failed = [f"part {i + 1} of {count} ({_exit_status(code)})" for i, code in enumerate(codes) if code]
    if failed:
        print(f"error: {', '.join(failed)} did not finish: the rows every part wrote are kept beside {out}; fix the "
              "cause (said above) and rerun the same command with --resume", file=sys.stderr)
        return 2
    return merge_and_report(out, count, began)


def _exit_status(code: int) -> str:
    """A process's exit status as a person reads it (-9: killed by SIGKILL)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _parts_ready(args, count: int) -> bool:
    problem, warnings = parts_problem(Path(args.out), count, args.resume, args.overwrite, args.batch_size)
    for warning in warnings:
        print(warning, file=sys.stderr)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return problem is None


def _user_threads() -> Optional[int]:
    """MMGCS_NUM_THREADS: the threads of each process, when the user chose (checked by main)."""
    return int(os.environ["MMGCS_NUM_THREADS"]) if os.environ.get("MMGCS_NUM_THREADS") else None


def _part_env(count: int) -> dict:
    """The parts' environment: each on its share of the cores, unless the user chose the threads."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and "MMGCS_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // count))
    return env


def _stop(parts: list[subprocess.Popen]) -> None:
    """Ask the parts still running to stop (they close their files, keeping every row written), then wait."""
    for p in parts:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for p in parts:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------------- under accelerate launch
def run_launched(args) -> int:
    """This process's part of a launched job; the main process then merges every part."""
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=LAUNCHED_WAIT)
    threads = launched_threads(state.device.type, state.num_processes, torch.get_num_threads())
    if threads:
        torch.set_num_threads(threads)
    out, count = Path(args.out), state.num_processes
    ready = _parts_ready(args, count) if state.is_main_process else parts_problem(
        out, count, args.resume, args.overwrite, args.batch_size)[0] is None
    if not ready:
        return 2  # every process sees the same files, so every one stops here
    if state.is_main_process and args.overwrite:
        remove_parts(out)
    state.wait_for_everyone()  # no part starts before the checks and the removal are done
    device = args.device or (str(state.device) if state.device.type != "cpu" else "cpu")
    code = run_part(args, state.process_index, count, progress=None if state.local_process_index == 0 else False,
                    device=device)
    state.wait_for_everyone()
    if state.is_main_process:
        code = merge_and_report(out, count, _process_start()) or code
    state.destroy_process_group()
    return code


# ------------------------------------------------------------------------------------------------ the merge
def merge_and_report(out: Path, count: int, began: float) -> int:
    """Merge the parts into `out` and say what the run did; the exit status. `began`: the run's start
    (`time.time()`)."""
    merge_began = time.time()
    try:
        merged = merge_parts(out, count)
    except PartsIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: could not write {str(out)!r} ({e.strerror or type(e).__name__}): the parts are kept beside "
              "it; free space and rerun the same command with --resume (it only merges)", file=sys.stderr)
        return 2
    now = time.time()
    print(summary(out, merged.states, now - began, now - merge_began, max(s.ready_at for s in merged.states) - began))
    first = merged.states[0]
    if first.duplicate_ids:
        print(duplicates_warning(RunStats(duplicate_ids=first.duplicate_ids,
                                          named_duplicates=first.named_duplicates)), file=sys.stderr)
    return 0


def summary(out: Path, states: list[PartState], seconds: float, merge_seconds: float, startup: float) -> str:
    """The run's line: rows, counts, and where its time went (start-up: until the last part's model was ready)."""
    written, errors = sum(s.written for s in states), sum(s.errors for s in states)
    already = states[0].start + sum(s.skipped for s in states)
    predicting = max(s.seconds for s in states)
    rate = written / predicting if predicting else 0.0
    return (f"{states[0].input_rows:,} movies in {out} ({written:,} predicted by {len(states)} processes, {errors:,} "
            f"with an error, {already:,} already there) in {seconds:.1f} s: start-up {startup:.1f} s, predicting "
            f"{predicting:.1f} s ({rate:,.1f} movies/s), merge {merge_seconds:.1f} s")


__all__ = ["launched_world_size", "main", "merge_and_report", "run_launched", "run_local", "run_part", "sharded",
           "summary"]
