"""`mmgcs predict` in 1 process vs N (`--num-processes N`, and optionally `accelerate launch -m mmgcs predict`):
wall time of the whole command, its start-up (imports + model load, until the last process is ready; one
process: wall - predicting), movies/s while predicting and the CPU seconds of all its processes, over the first
--rows movies of a source (their posters copied beside them), with the machine's load average before and after
each run; then checks that every run wrote the same rows as the first (ids, input order, genres, largest score
difference).

    python benchmarks/bench_predict_shards.py --model runs/fusion/model --source ../shared/data/tmdb5000/movies.jsonl \
        --rows 400 --runs 1,2,1,2 [--launch 2] [--batch-size 32] [--keep DIR]

Each run is `python -m mmgcs predict` as a user types it (threads: the command's own defaults, OMP_NUM_THREADS
unset). The JSON of every run goes to stderr, a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# "400 movies written to x.csv (0 with an error) in 80.1 s: 5 movies/s"  (one process)
ONE = re.compile(r"([\d,]+) movies written to .* in ([\d.]+) s:")
# "... in 95.3 s: start-up 12.1 s, predicting 80.2 s (4.9 movies/s), merge 0.1 s"  (several)
MANY = re.compile(r"([\d,]+) movies in .* in ([\d.]+) s: start-up ([\d.]+) s, predicting ([\d.]+) s")


def subset(source: Path, rows: int, folder: Path) -> Path:
    """The first `rows` lines of a JSONL source, with the posters they name copied beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = source.read_text(encoding="utf-8").splitlines()[:rows]
    for line in lines:
        poster = json.loads(line).get("poster_file")
        if poster and (source.parent / poster).is_file():
            (folder / poster).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / poster, folder / poster)
    path = folder / "movies.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def command(kind: str, processes: int, model: str, source: Path, out: Path, batch_size: int) -> list[str]:
    predict = ["-m", "mmgcs", "predict", "--model", model, "--input", str(source), "--out", str(out),
               "--batch-size", str(batch_size), "--no-progress"]
    if kind == "launch":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *predict]
    return [sys.executable, *predict, *(["--num-processes", str(processes)] if processes > 1 else [])]


def run(kind: str, processes: int, args, source: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = command(kind, processes, args.model, source, out, args.batch_size)
    load_before, cpu_before = os.getloadavg(), _children_cpu()
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    cpu = _children_cpu() - cpu_before  # every process of the run (the parts and launchers are waited for)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    many, one = MANY.search(done.stdout), ONE.search(done.stdout)
    rows = int((many or one).group(1).replace(",", ""))
    predicting = float(many.group(4)) if many else float(one.group(2))
    return {"kind": kind, "processes": processes, "rows": rows, "wall_s": round(wall, 1),
            # one process: all but predicting
            "startup_s": round(float(many.group(3)) if many else wall - predicting, 1),
            "predicting_s": round(predicting, 1), "movies_per_s": round(rows / predicting, 2),
            "movies_per_s_wall": round(rows / wall, 2), "cpu_s": round(cpu, 1),
            "cpu_ms_per_movie": round(1000 * cpu / rows), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "command": " ".join(cmd[1:]), "out": str(out)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compare(first: Path, other: Path) -> dict:
    """Rows, order and genres equal? Largest score difference?"""
    a = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    b = [json.loads(line) for line in other.read_text(encoding="utf-8").splitlines()]
    scores = [k for k, v in a[0].items() if isinstance(v, float)] if a else []
    return {"same_rows": [(r["id"], r["input_row"]) for r in a] == [(r["id"], r["input_row"]) for r in b],
            "same_genres": [r["genres"] for r in a] == [r["genres"] for r in b],
            "max_score_diff": max((abs((x[k] or 0) - (y[k] or 0)) for x, y in zip(a, b) for k in scores), default=0.0),
            "identical": a == b}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--source", required=True, type=Path, help="a JSONL source (poster_file relative to it)")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--runs", default="1,2", help="process counts, in order (e.g. 1,2,1,2 alternates)")
    p.add_argument("--launch", type=int, default=0, help="also accelerate launch with this many processes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--keep", type=Path, help="a folder to keep the subset and the outputs in")
    args = p.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-shards-"))
    source = subset(args.source, args.rows, folder / "input")
    plan = [("local", int(n)) for n in args.runs.split(",")] + ([("launch", args.launch)] if args.launch else [])
    results = []
    for i, (kind, n) in enumerate(plan):
        result = run(kind, n, args, source, folder / f"run{i}-{kind}-{n}.jsonl")
        if results:
            result.update(compare(Path(results[0]["out"]), Path(result["out"])))
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    print("| run | processes | rows | wall (s) | start-up (s) | predicting (s) | movies/s predicting | movies/s wall "
          "| CPU (s) | load avg 1 min before → after | same as run 1 |")
    print("|---" * 11 + "|")
    for i, r in enumerate(results):
        same = "—" if not i else (
            "identical" if r["identical"] else f"genres {r['same_genres']}, max diff {r['max_score_diff']:.1e}")
        print(f"| {i + 1} {r['kind']} | {r['processes']} | {r['rows']:,} | {r['wall_s']} | {r['startup_s']} | "
              f"{r['predicting_s']} | {r['movies_per_s']} | {r['movies_per_s_wall']} | {r['cpu_s']} | "
              f"{r['load_before'][0]} → {r['load_after'][0]} | {same} |")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
