"""Sharded `mmgcs predict` (mmgcs.sharded_predict; how parts are dealt and merged: tests/test_shards.py): the merged
parts are the one-process output to the byte (CSV, JSONL) or value (parquet), in input order, duplicate ids and bad
rows included; `--num-processes 2` and `accelerate launch -m mmgcs predict` give it too; a part killed mid-run is
finished by `--resume` and the merge is still exact; parts of an unfinished run need --resume or --overwrite."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine_helpers import REPO_ROOT, subprocess_env
from shard_helpers import BATCH, args_of, bundle, one_process, run_parts_here, same_output, source  # noqa: F401

from mmgcs.shards import part_path, parts_on_disk, read_state
from mmgcs.sharded_predict import main as sharded_main
from mmgcs.sharded_predict import run_part


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_the_merged_parts_are_the_one_process_output(bundle, source, tmp_path, suffix):
    reference = one_process(bundle, source, tmp_path / f"one{suffix}", by_modality=True)
    out = tmp_path / f"three{suffix}"
    args = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH, "--by-modality")
    assert run_parts_here(args, 3) == 0
    same_output(reference, out)  # every row once, in input order, the same scores to the bit
    assert parts_on_disk(out) == {}  # the parts and their states are removed once merged
    # --resume over the finished output predicts nothing and leaves it as it was
    again = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH, "--by-modality",
                    "--resume")
    assert run_parts_here(again, 3) == 0
    same_output(reference, out)


def test_more_processes_than_batches_and_a_one_process_output_continued_by_parts(bundle, source, tmp_path, capsys):
    reference = one_process(bundle, source, tmp_path / "one.jsonl")
    out = tmp_path / "many.jsonl"
    assert run_parts_here(args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH), 8) == 0
    same_output(reference, out)  # 23 rows in 6 blocks: parts 7 and 8 are empty
    # A one-process run stopped after 9 rows, in the middle of the 10th: the parts predict the rows after them.
    lines = reference.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:9]) + lines[9][:15])
    resume = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH, "--resume")
    assert run_parts_here(resume, 2) == 0
    same_output(reference, out)
    assert "(14 predicted by 2 processes, 1 with an error, 9 already there)" in capsys.readouterr().out


def test_parts_of_an_unfinished_run_need_resume_or_overwrite(bundle, source, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH, "--num-processes", 2)
    assert run_part(args, 0, 2, progress=False) == 0
    assert sharded_main(args, []) == 2
    err = capsys.readouterr().err
    assert "parts of an unfinished sharded run" in err and "--resume" in err and "--overwrite" in err
    other = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", 8, "--num-processes", 2,
                    "--resume")
    assert sharded_main(other, []) == 2
    assert "was started with --batch-size 4: resume with --batch-size 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- processes of their own
def mmgcs(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmgcs", *map(str, args)], env=subprocess_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_give_the_one_process_output(bundle, source, tmp_path):
    reference = one_process(bundle, source, tmp_path / "one.csv", by_modality=True)
    out = tmp_path / "two.csv"
    run = mmgcs("predict", "--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH,
                "--by-modality", "--num-processes", 2)
    assert run.returncode == 0, run.stderr
    same_output(reference, out)
    assert "23 movies in" in run.stdout and "predicted by 2 processes" in run.stdout
    assert "part 2 of 2: 11 movies written" in run.stderr and "1 id(s) occur on more than one row" in run.stderr
    assert parts_on_disk(out) == {}


@pytest.mark.slow
def test_a_part_killed_mid_run_is_finished_by_resume_and_the_merge_is_exact(bundle, tmp_path):
    ROWS = 1000  # noqa: N806  (part 2 predicts for seconds in batches of 2: time to kill it mid-way)
    source = tmp_path / "movies.jsonl"
    source.write_text("".join(json.dumps({"id": i, "plot": f"a detective hunts a killer {i} " * (1 + i % 4)}) + "\n"
                              for i in range(ROWS)), encoding="utf-8")
    out = tmp_path / "p.jsonl"
    command = [sys.executable, "-m", "mmgcs", "predict", "--model", str(bundle), "--input", str(source), "--out",
               str(out), "--batch-size", "2", "--num-processes", "2"]
    run = subprocess.Popen(command, env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    second, deadline = part_path(out, 1, 2), time.monotonic() + 180
    try:
        while not (second.is_file() and second.read_bytes().count(b"\n") >= 20):  # part 2 is predicting
            assert run.poll() is None and time.monotonic() < deadline, "part 2 never started predicting"
            time.sleep(0.02)
        child = next(c for c in psutil.Process(run.pid).children() if "--part" in c.cmdline())
        child.send_signal(signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2, stderr
    assert "part 2 of 2 (killed by SIGKILL) did not finish" in stderr and "--resume" in stderr
    assert not out.exists() and not read_state(out, 1, 2).complete and read_state(out, 0, 2).complete
    written = second.read_bytes().count(b"\n")
    assert 20 <= written < ROWS // 2

    resumed = subprocess.run([*command, "--resume"], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{ROWS // 2 - written:,} predicted by 2 processes" in resumed.stdout
    assert f"{ROWS // 2 + written:,} already there" in resumed.stdout
    reference = one_process(bundle, source, tmp_path / "one.jsonl", batch_size=2)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(ROWS)]  # every row once, in input order
    expected = [json.loads(line) for line in reference.read_text(encoding="utf-8").splitlines()]
    # The one-process batches, but for the block the kill cut (if it cut one mid-way), whose rest is predicted as a
    # smaller batch: its scores may then differ by one step of the 6th decimal.
    differ = [(row, want) for row, want in zip(rows, expected) if row != want]
    assert len(differ) <= 2, differ
    for row, want in differ:
        assert (row["input_row"], row["error"]) == (want["input_row"], want["error"])
        assert all(abs(row[g] - want[g]) <= 1.5e-6 for g in GENRES), (row, want)
    assert parts_on_disk(out) == {}


@pytest.mark.slow
def test_accelerate_launch_shares_the_input_between_its_processes(bundle, source, tmp_path):
    reference = one_process(bundle, source, tmp_path / "one.parquet")
    out = tmp_path / "launched.parquet"
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU")  # with it, accelerate launch starts one process
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
                          "--dynamo_backend", "no", "-m", "mmgcs", "predict", "--model", str(bundle), "--input",
                          str(source), "--out", str(out), "--batch-size", str(BATCH)],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    same_output(reference, out)
    assert "predicted by 2 processes" in run.stdout and run.stdout.count("23 movies in") == 1  # the main merges
    assert parts_on_disk(out) == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
