"""Sharded `mmgcs predict` (mmgcs.shards, mmgcs.sharded_predict): the parts cover every input row once, and their
merge is the one-process output to the byte (CSV, JSONL) or value (parquet), in input order, duplicate ids and
bad rows included; `--num-processes 2` and `accelerate launch -m mmgcs predict` give it too; a part killed
mid-run is finished by `--resume` and the merge is still exact; a missing, unfinished or short part stops the
merge with its name and the remedy, and nothing is written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from data_helpers import image_bytes
from engine_helpers import GENRES, REPO_ROOT, subprocess_env

from mmgcs.batch_predict import load_predictor, predict_file
from mmgcs.cli import build_parser
from mmgcs.shards import Shard, merge_parts, part_path, parts_on_disk, read_state, state_path, write_state
from mmgcs.sharded_predict import main as sharded_main
from mmgcs.sharded_predict import merge_and_report, run_part
from mmgcs.testing import tiny_model

BATCH = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "model"
    tiny_model(GENRES).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """23 movies of plots of many lengths (batches pad differently), a poster, a repeated id, two bad rows."""
    root = tmp_path_factory.mktemp("movies")
    (root / "posters").mkdir()
    (root / "posters" / "p.jpg").write_bytes(image_bytes(size=(40, 60)))
    rows = [{"id": i, "title": f"Movie {i}", "plot": "a detective hunts a killer in the rain " * (1 + i % 6)}
            for i in range(20)]
    rows[3]["poster_file"] = "posters/p.jpg"
    rows[7] = {"id": 7, "title": "Empty", "plot": ""}  # no plot, no poster: its row's error
    rows += [{"id": 5, "title": "Again", "plot": "the same id on a second row"}, {"id": 21, "plot": "x" * 10_001},
             {"id": 22, "title": "Last", "plot": "a family on a journey"}]
    path = root / "movies.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def args_of(*argv) -> object:
    return build_parser().parse_args(["predict", *map(str, argv)])


def one_process(bundle: Path, source: Path, out: Path, batch_size: int = BATCH, **options) -> Path:
    """What `mmgcs predict` writes in one process (the reference): the same batch size, or other batches; its
    predictor loaded as the command loads it (the fast path unless MMGCS_FAST_PATH=0)."""
    predictor = load_predictor(args_of("--model", bundle, "--input", source, "--out", out))
    predict_file(predictor, str(source), out, batch_size=batch_size, progress=False, **options)
    return out


def same_output(a: Path, b: Path) -> None:
    if a.suffix == ".parquet":
        assert pq.read_table(a).to_pylist() == pq.read_table(b).to_pylist()
    else:
        assert a.read_bytes() == b.read_bytes()


def run_parts_here(args, count: int) -> int:
    """Every part in this process, one after the other, then the merge (what N processes and the main one do)."""
    for index in range(count):
        assert run_part(args, index, count, progress=False) == 0
    return merge_and_report(Path(args.out), count, time.time())


@pytest.mark.parametrize("rows, block, count, start", [(23, 4, 3, 0), (23, 4, 5, 0), (100, 7, 3, 12), (5, 8, 2, 0),
                                                       (0, 4, 2, 0), (40, 4, 2, 40)])
def test_the_parts_deal_every_row_once_in_blocks(rows, block, count, start):
    owners = [[i for i in range(rows) if Shard(k, count, start, block).owns(i)] for k in range(count)]
    assert sorted(i for part in owners for i in part) == list(range(start, rows))
    assert [len(part) for part in owners] == [Shard(k, count, start, block).rows(rows) for k in range(count)]
    for k, part in enumerate(owners):  # whole blocks, each the one-process batch at that place
        assert all(((i - start) // block) % count == k for i in part)


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


def test_the_merge_refuses_a_missing_unfinished_or_short_part(bundle, source, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = args_of("--model", bundle, "--input", source, "--out", out, "--batch-size", BATCH)
    for index in range(2):
        assert run_part(args, index, 2, progress=False) == 0
    second, kept = part_path(out, 1, 2), part_path(out, 1, 2).read_bytes()

    second.unlink()
    assert merge_and_report(out, 2, time.time()) == 2
    err = capsys.readouterr().err
    assert f"part 2 of 2 is missing ({second})" in err and "rerun the same command with --resume" in err

    second.write_bytes(kept)
    state = read_state(out, 1, 2)
    state.complete = False  # what a kill leaves: the state written when the part started
    write_state(out, state)
    assert merge_and_report(out, 2, time.time()) == 2
    err = capsys.readouterr().err
    assert f"part 2 of 2 ({second}) is unfinished" in err and "--resume" in err

    state.complete = True
    write_state(out, state)
    second.write_bytes(b"".join(kept.splitlines(keepends=True)[:-2]))  # a part that lost its last rows
    assert merge_and_report(out, 2, time.time()) == 2
    assert f"part 2 of 2 ({second.name}) ends after" in capsys.readouterr().err

    # Nothing was written, and every part stays for the rerun.
    assert not out.exists() and not out.with_name(out.name + ".merging").exists()
    assert part_path(out, 0, 2).is_file() and state_path(out, 1, 2).is_file()
    second.write_bytes(kept)
    assert merge_parts(out, 2).rows == 23


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
