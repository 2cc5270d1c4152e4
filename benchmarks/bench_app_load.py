"""Load test of the Space: N concurrent `gradio_client` callers for T seconds against the running app.

    python benchmarks/bench_app_load.py                       # starts app.py on a free loopback port
    python benchmarks/bench_app_load.py --callers 1,4,16 --seconds 20 --model runs/fusion/model
    python benchmarks/bench_app_load.py --url http://127.0.0.1:7860 --server-pid 1234   # an app already running
    python benchmarks/bench_app_load.py --model runs/fusion/model --env MMGCS_PRECISION=fp32 --paths eager,fast
    python benchmarks/bench_app_load.py --model runs/fusion/model --callers 1,16 --batch 1,8,16   # /predict_batch
    python benchmarks/bench_app_load.py --model runs/fusion/model --callers 1x8,1x16,16x1   # callers x movies a call

Each caller sends real movies (plot + poster from ../shared/data/tmdb5000 when present, otherwise generated ones)
through `/predict`, as a user's script would: a poster upload, then the queued call. Prints requests/s, errors,
p50/p95/p99 round-trip latency, server CPU ms a movie and the server's peak memory (VmHWM of its process); with
--model, also the compute ceiling (the counted FLOPs of a movie, the mean of 32 of those sent, at the all-core fp32
matmul rate measured before the app starts and after it stops) and the share of it
reached; with --paths eager,fast, one app per serving path, one after the other (issue 12). With --batch 1,8,16 each
level runs once per size (or `--callers CxN`: C callers of N movies a call): 1 is `/predict`, N > 1 sends N movies
per `/predict_batch` call (issue 20), and the table
counts movies (movies/s, server CPU a movie) beside calls (latency of a call). Loopback only: it refuses any other
host, and the callers run on the same machine as the server, so they share its CPU.

Abuse (issue 18): --explain-callers K runs K more callers asking for explanations (plot + poster, explain=true)
during each level, and reports their count and latency beside the plain callers' (--callers 1 --explain-callers 16:
a plain caller's p50 with 16 explain callers running); --join-flood N first sends N `queue/join` explain requests
from one client (one session, then N more from new sessions) without reading any result, reports how many were
accepted and refused, and a plain request's latency right after each. --spy S records the server with py-spy for S
seconds of the last level and prints its CPU samples per stage (towers, head, decode, Gradio; issue 12's profile).
The callers send no telemetry (gradio_client's is on unless `analytics_enabled=False`, whatever
GRADIO_ANALYTICS_ENABLED says; huggingface_hub's is off too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

# Before gradio_client is imported: nothing here may phone home (gradio_client's own switch is `analytics_enabled`
# on each Client below; huggingface_hub reads this one when it is imported).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMGCS_SHARED_DATA", REPO.parent / "shared" / "data"))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
FLOOD_ADDRESS = "127.0.0.2"  # --join-flood's client (Linux answers all of 127.0.0.0/8 on loopback)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of a process (Linux VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a process (all its threads) has used so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def movies(n: int, workdir: Path) -> tuple[list[tuple[str | None, str | None]], str]:
    """Up to n (plot, poster path) pairs: real TMDb movies when the shared data is present, else generated."""
    source = SHARED / "tmdb5000" / "movies.jsonl"
    out = []
    if source.is_file():
        with source.open() as f:
            for line in f:
                row = json.loads(line)
                poster = SHARED / "tmdb5000" / row["poster_file"] if row.get("poster_file") else None
                if row.get("plot") and poster is not None and poster.is_file():
                    out.append((row["plot"], str(poster)))
                if len(out) >= n:
                    break
        return out, f"{len(out)} real TMDb movies (plot + poster)"
    from PIL import Image

    rng = random.Random(0)
    words = "a detective hunts a killer while a family hides in the old house near the sea during the war".split()
    for i in range(n):
        file = workdir / f"poster{i}.jpg"
        Image.new("RGB", (200, 300), tuple(rng.randrange(256) for _ in range(3))).save(file, quality=90)
        out.append((" ".join(rng.choice(words) for _ in range(60)).capitalize() + ".", str(file)))
    return out, f"{n} generated movies (60-word plot + 200x300 poster; shared data absent)"


def start_app(model: str | None, port: int, extra_env: dict) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               MMGCS_EXAMPLES="", **extra_env)
    if model:
        env["MMGCS_MODEL"] = model
    return subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_up(url: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"app.py exited with code {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/gradio_api/info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the app at {url} did not answer within {timeout:.0f} s")


def bad_requests(workdir: Path) -> list[dict]:
    """Inputs the app must refuse, each with a message: a text file as a poster, an over-long plot, nothing."""
    fake = workdir / "not-a-poster.png"
    fake.write_text("this is not an image")
    return [{"plot": "A plot.", "poster": str(fake)}, {"plot": "word " * 5000, "poster": None},
            {"plot": None, "poster": None}]


def new_client(url: str, verify_ssl: bool = False):
    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=verify_ssl, analytics_enabled=False)


def call_app(client, movies: list, mode: str) -> int:
    """One call for `movies`: `/predict` for one, `/predict_batch` for several; the movies answered (raises when any
    movie of the call is not answered with scores)."""
    from gradio_client import handle_file

    def fields(plot, poster):
        return {"plot": plot if mode in ("both", "plot") else None,
                "poster": handle_file(poster) if mode in ("both", "poster") else None}

    if len(movies) == 1:
        if not client.predict(**fields(*movies[0]), api_name="/predict").get("scores"):
            raise ValueError("empty scores")
        return 1
    answers = client.predict(movies=[fields(*m) for m in movies], api_name="/predict_batch")
    missing = [a for a in answers if not a.get("scores")]
    if len(answers) != len(movies) or missing:
        raise ValueError(f"{len(missing)} of {len(movies)} movies without scores (first: {missing[:1]})")
    return len(movies)


def run_level(url: str, callers: int, seconds: float, items: list, mode: str, server_pid: int | None = None,
              verify_ssl: bool = False, bad: list | None = None, bad_every: int = 0, explain_callers: int = 0,
              batch: int = 1) -> dict:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    latencies: list[float] = []
    errors: list[str] = []
    answered = [0]  # movies answered (a /predict_batch call answers several)
    refused = [0, 0]  # bad requests refused with a message, and bad requests answered or refused without one
    lock = threading.Lock()
    # gradio_client opens a new httpx client for each HTTP call; with certificate checks on, each one loads the CA
    # bundle (~28 ms of CPU, 3 per predict). Over plain-HTTP loopback there is no TLS to verify, and the callers
    # share the server's CPU, so they skip that cost (--verify-ssl restores it).
    clients = [new_client(url, verify_ssl) for _ in range(callers + explain_callers)]  # before the clock
    start_line = threading.Barrier(callers + explain_callers + 1)
    deadline = [0.0]
    explained: list[float] = []
    explain_errors: list[str] = []

    def explainer(k: int) -> None:
        client, i = clients[callers + k], k
        start_line.wait()
        while time.perf_counter() < deadline[0]:
            plot, poster = items[i % len(items)]
            i += explain_callers
            t0 = time.perf_counter()
            try:
                result = client.predict(plot=plot, poster=handle_file(poster), explain=True, api_name="/predict")
                ok, msg = "explanation" in result, "an answer without an explanation"
            except Exception as e:  # noqa: BLE001 — counted, reported
                ok, msg = False, f"{type(e).__name__}: {e}"
            with lock:
                if ok:
                    explained.append(time.perf_counter() - t0)
                else:
                    explain_errors.append(msg)

    def caller(k: int) -> None:
        client = clients[k]
        i = k
        start_line.wait()
        calls = 0
        while time.perf_counter() < deadline[0]:
            calls += 1
            if bad_every and calls % bad_every == 0:
                spec = bad[(calls // bad_every) % len(bad)]
                try:
                    client.predict(plot=spec["plot"], poster=handle_file(spec["poster"]) if spec["poster"] else None,
                                   api_name="/predict")
                    good = False
                except AppError as e:
                    good = bool(str(e).strip())
                except Exception:  # noqa: BLE001 — no message: the app failed this bad request
                    good = False
                with lock:
                    refused[0 if good else 1] += 1
                continue
            chosen = [items[(i + j * callers) % len(items)] for j in range(batch)]
            i += callers * batch
            t0 = time.perf_counter()
            try:
                n, ok = call_app(client, chosen, mode), True
            except Exception as e:  # noqa: BLE001 — every failure counts as an error of the run
                ok, msg = False, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                    answered[0] += n
                else:
                    errors.append(msg)

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(callers)]
    threads += [threading.Thread(target=explainer, args=(k,), daemon=True) for k in range(explain_callers)]
    for t in threads:
        t.start()
    server_cpu0, client_cpu0 = cpu_seconds(server_pid), time.process_time()
    t_start = time.perf_counter()
    deadline[0] = t_start + seconds
    start_line.wait()
    for t in threads[:callers]:
        t.join()
    elapsed = time.perf_counter() - t_start  # the plain callers' span (explain callers may still wait for answers)
    server_cpu1, client_cpu1 = cpu_seconds(server_pid), time.process_time()
    for t in threads[callers:]:
        t.join()
    for c in clients:
        c.close()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 else [float("nan")] * 99
    done = max(answered[0] + len(errors) * batch, 1)  # movies sent (a failed call's count as tried)
    server_ms = (server_cpu1 - server_cpu0) * 1000 / done if server_cpu0 is not None else float("nan")
    return {"callers": callers, "batch": batch, "ok": len(latencies), "errors": len(errors),
            "rps": answered[0] / elapsed, "calls_per_s": len(latencies) / elapsed,
            "server_ms": server_ms, "client_ms": (client_cpu1 - client_cpu0) * 1000 / done,
            "p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000, "first_error": errors[0] if errors else "",
            "bad_refused": refused[0], "bad_wrong": refused[1], "explain_callers": explain_callers,
            "explained": len(explained), "explain_errors": len(explain_errors),
            "explain_p50": statistics.median(explained) * 1000 if explained else float("nan"),
            "first_explain_error": explain_errors[0] if explain_errors else ""}


def drained(url: str, timeout: float = 300) -> bool:
    """Wait until the app's queue is empty (a join flood's jobs done), at most `timeout` seconds."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(f"{url}/gradio_api/queue/status", timeout=10).json().get("queue_size") == 0:
            return True
        time.sleep(1)
    return False


def join_flood(url: str, n: int, items: list, verify_ssl: bool = False) -> list[dict]:
    """The queue-flood reproduction: `n` explain `queue/join` requests (plot + poster) sent from one client by 8
    threads, results never read; first all from one session, then each from a new session. Each round: accepted,
    refused (and the first refusal's message), seconds taken, and a plain /predict's latency right after it."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from gradio_client import handle_file

    client = new_client(url, verify_ssl)
    fn = client._infer_fn_index("/predict", None)
    plot, poster = items[0]
    uploaded = client.endpoints[fn]._upload_file(handle_file(poster), 1)  # one upload, reused by every join
    rounds = []
    for sessions in ("one session", "a new session each"):
        shared = uuid.uuid4().hex[:12]

        def join(_):
            session = shared if sessions == "one session" else uuid.uuid4().hex[:12]
            r = flooder.post(f"{url}/gradio_api/queue/join", timeout=120, json={
                "fn_index": fn, "session_hash": session, "data": [plot, uploaded, None, True]})
            return r.status_code, r.text

        t0 = time.perf_counter()
        # from another loopback address than the plain request's: on a real server they are two clients
        with httpx.Client(transport=httpx.HTTPTransport(local_address=FLOOD_ADDRESS)) as flooder, \
                ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(join, range(n)))
        took = time.perf_counter() - t0
        t1 = time.perf_counter()
        normal = "answered"
        try:  # bounded: against an app without the caps it can wait minutes behind the flood
            client.submit(plot=items[1 % len(items)][0], api_name="/predict").result(timeout=300)
        except TimeoutError:
            normal = "no answer yet"
        except Exception as e:  # noqa: BLE001 — e.g. the queue full: the plain caller refused
            normal = f"refused ({type(e).__name__}: {e})"
        rounds.append({"sessions": sessions, "sent": n, "seconds": took,
                       "accepted": sum(code == 200 for code, _ in answers),
                       "refused": sum(code != 200 for code, _ in answers),
                       "codes": sorted({code for code, _ in answers}),
                       "message": next((text[:200] for code, text in answers if code != 200), ""),
                       "normal_after_ms": (time.perf_counter() - t1) * 1000, "normal": normal})
        print_flood(rounds[-1])
        time.sleep(2)
    client.close()
    return rounds


def compute_ceiling(model_path: str, n_movies: int, samples: int = 32) -> tuple[float, float, float]:
    """(movies/s the machine's arithmetic allows, GFLOP a movie, fp32 matmul GFLOP/s on every core): the mean FLOPs
    of `samples` of the movies the callers send (plot + poster, by_modality, counted by torch.utils.flop_counter;
    the text tower's work follows the plot's length: the first TMDb movie has 58 tokens, the first 256 average 65)
    at the all-core fp32 matmul rate."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_profile
    from mmgcs import GenreClassifier
    from mmgcs.inference import Predictor

    items, _ = movies(n_movies, Path(tempfile.gettempdir()))
    predictor = Predictor(GenreClassifier.from_pretrained(model_path))
    picked = items[:: max(1, len(items) // samples)][:samples]
    flops = statistics.mean(bench_profile.count_flops(predictor, plot, poster, True) for plot, poster in picked)
    rate = matmul_rate_now()
    return rate / flops, flops / 1e9, rate / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an app already running on loopback (default: start app.py here)")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, to report its peak memory")
    ap.add_argument("--model", help="MMGCS_MODEL for the app started here (default: the app's own default)")
    ap.add_argument("--callers", default="1,16", help="comma-separated numbers of concurrent callers (CxN: C callers "
                    "sending N movies a call, whatever --batch says)")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of untimed calls before each level")
    ap.add_argument("--mode", choices=["both", "plot", "poster"], default="both", help="what each call sends")
    ap.add_argument("--batch", default="1", help="comma-separated movies per call: 1 = /predict, N > 1 = N movies "
                    "per /predict_batch call (each callers level runs once per size)")
    ap.add_argument("--movies", type=int, default=256, help="distinct movies to cycle through")
    ap.add_argument("--verify-ssl", action="store_true",
                    help="let the callers load the CA bundle on every HTTP call, as gradio_client does by default")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for the app")
    ap.add_argument("--bad-every", type=int, default=0, metavar="N",
                    help="each caller sends a bad request (non-image poster, over-long plot, nothing) every N-th call;"
                         " each must be refused with a message")
    ap.add_argument("--explain-callers", type=int, default=0, metavar="K",
                    help="K more callers asking for explanations during each level (issue 18's explain flood)")
    ap.add_argument("--join-flood", type=int, default=0, metavar="N",
                    help="first send N queue/join explain requests from one client, never reading the results")
    ap.add_argument("--spy", type=float, default=0, metavar="SECONDS",
                    help="record the server with py-spy during the last level (at most its --seconds) and print its "
                         "CPU samples per stage; needs py-spy (pip install py-spy) and the server's pid")
    ap.add_argument("--spy-out", metavar="FILE", help="with --spy: also keep py-spy's raw stacks in FILE (one "
                    "collapsed stack and its sample count a line; e.g. for a flame graph)")
    ap.add_argument("--paths", default="",
                    help="eager,fast: start one app per serving path (MMGCS_FAST_PATH=0 / 1) and report each, in one run")
    args = ap.parse_args(argv)

    ceiling = compute_ceiling(args.model, args.movies) if args.model else None  # before the app starts: no contention
    paths = [p for p in args.paths.split(",") if p] or [""]
    if args.url and paths != [""]:
        raise SystemExit("--paths starts its own apps; leave out --url")
    for path in paths:
        env = dict(kv.split("=", 1) for kv in args.env)
        if path:
            env["MMGCS_FAST_PATH"] = {"eager": "0", "fast": "1"}[path]
            print(f"\n## serving path: {path} (MMGCS_FAST_PATH={env['MMGCS_FAST_PATH']})")
        load_before = os.getloadavg()[0]
        result = measure(args, env)
        if ceiling:  # the machine's rate again once the app has stopped: other work may have come or gone meanwhile
            result["rate_after"] = matmul_rate_now()
        report(args, result, load_before, ceiling)


def matmul_rate_now() -> float:
    """The all-core fp32 2048³ matmul rate now, in FLOP/s."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_profile

    return bench_profile.matmul_rate(os.cpu_count() or 1, n=2048)


def measure(args, env: dict) -> dict:
    """Start the app (or use --url), run each callers level, stop the app: what `report` prints."""
    proc = None
    if args.url:
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in LOOPBACK:
            raise SystemExit(f"{url}: this benchmark only runs against loopback (127.0.0.1 / localhost)")
        pid = args.server_pid
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # every caller runs from this one address: room for all of them under the per-address job cap
        # (a /predict_batch call counts as its movies)
        most = max(n * size for n, size in levels_of(args)) + args.explain_callers
        env.setdefault("MMGCS_MAX_JOBS_PER_IP", str(max(32, 2 * most)))
        proc = start_app(args.model, port, env)
        pid = proc.pid
    try:
        t0 = time.time()
        wait_until_up(url, proc)
        startup = time.time() - t0 if proc is not None else None
        info = new_client(url).predict(api_name="/model_info")
        with tempfile.TemporaryDirectory() as tmp:
            items, what = movies(args.movies, Path(tmp))
            bad = bad_requests(Path(tmp))
            flood = join_flood(url, args.join_flood, items, args.verify_ssl) if args.join_flood else []
            rows, stages = [], None
            if flood:
                drained(url)
            levels = [(n, size, e) for n, size in levels_of(args) for e in sorted({0, args.explain_callers})]
            for i, (n, size, explainers) in enumerate(levels):
                if args.warmup > 0 and explainers == 0:
                    run_level(url, n, args.warmup, items, args.mode, verify_ssl=args.verify_ssl, batch=size)
                # with explain callers, each level runs first without them: the unloaded figures on the same app
                last = args.spy and i == len(levels) - 1
                spy = start_spy(pid, min(args.spy, args.seconds), Path(tmp)) if last else None
                rows.append(run_level(url, n, args.seconds, items, args.mode, pid, args.verify_ssl, bad,
                                      args.bad_every, explainers, batch=size))
                stages = finish_spy(spy, Path(tmp)) if spy else stages
                if spy and args.spy_out and (Path(tmp) / "spy.txt").is_file():
                    shutil.copyfile(Path(tmp) / "spy.txt", args.spy_out)
        peak = peak_rss_mb(pid) if pid else None
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"url": url, "info": info, "what": what, "rows": rows, "peak": peak, "startup": startup, "flood": flood,
            "stages": stages}


def levels_of(args) -> list[tuple[int, int]]:
    """(callers, movies a call) of each level: --callers C runs once per --batch size, --callers CxN with N."""
    out = []
    for spec in args.callers.split(","):
        callers, _, size = spec.strip().partition("x")
        out += [(int(callers), int(size))] if size else [(int(callers), n) for n in sizes(args)]
    if min(min(level) for level in out) < 1:
        raise SystemExit(f"--callers {args.callers}: callers and movies a call are at least 1")
    return out


def sizes(args) -> list[int]:
    """--batch's sizes (movies per call), each at least 1."""
    out = [int(x) for x in str(args.batch).split(",") if x.strip()]
    if not out or min(out) < 1:
        raise SystemExit(f"--batch {args.batch}: give movies per call, e.g. 1,8,16")
    return out


def start_spy(pid: int | None, seconds: float, folder: Path) -> subprocess.Popen:
    """py-spy recording the server (its raw stacks into folder/spy.txt) while the level runs."""
    spy = Path(sys.executable).with_name("py-spy")
    spy = str(spy) if spy.is_file() else shutil.which("py-spy")
    if not spy or not pid:
        raise SystemExit("--spy needs py-spy (pip install py-spy) and the server's pid (--server-pid with --url)")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate",
                             "200", "--format", "raw", "--nonblocking", "-o", str(folder / "spy.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_spy(spy: subprocess.Popen, folder: Path) -> dict:
    """The stage table of what py-spy recorded (or why it recorded nothing, e.g. no ptrace permission)."""
    _, err = spy.communicate(timeout=120)
    raw = folder / "spy.txt"
    if spy.returncode or not raw.is_file():
        return {"error": f"py-spy exit {spy.returncode}: {err.strip()[-300:]}"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_profile

    counts, total = bench_profile.spy_stages(raw.read_text(encoding="utf-8").splitlines())
    return {"counts": dict(counts.most_common()), "total": total}


def print_stages(stages: dict) -> None:
    if "error" in stages:
        print(f"\npy-spy: {stages['error']}")
        return
    print("\n| stage (app server, py-spy, last level) | share of CPU samples |\n|---|---:|")
    for stage, n in stages["counts"].items():
        print(f"| {stage} | {n / max(stages['total'], 1):.0%} |")
    print(f"| total samples | {stages['total']} |")


def print_flood(f: dict) -> None:
    print(f"\njoin flood ({f['sessions']}): {f['sent']} explain joins in {f['seconds']:.1f} s: {f['accepted']} "
          f"accepted, {f['refused']} refused (HTTP {f['codes']}); a plain request right after: {f['normal']} after "
          f"{f['normal_after_ms']:.0f} ms" + (f"\n  refusal: {f['message']}" if f["message"] else ""), flush=True)


def report(args, result: dict, load_before: float, ceiling) -> None:
    url, info, what, rows, peak, startup = (result[k] for k in ("url", "info", "what", "rows", "peak", "startup"))
    print(f"\napp: {url}  model: text={info['text_backbone']} image={info['image_backbone']} fusion={info['fusion']}"
          f" ({len(info['labels'])} genres) on {info.get('device')} in {info.get('precision')}  limits: {info['limits']}")
    print(f"inputs: {what}; mode={args.mode}; {args.seconds:g} s per level after {args.warmup:g} s warm-up; "
          f"cpus={os.cpu_count()}; callers ssl_verify={args.verify_ssl}" + (f"; app start-up {startup:.1f} s" if startup is not None else ""))
    print(f"machine load average (1 min): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          "(other work on the machine slows every number below)")
    # CPU time per request does not depend on what else the machine runs: it bounds the throughput of an idle
    # machine at (cores x 1000) / (server + caller CPU ms) movies/s when the callers share it, as here.
    if ceiling:
        after = result.get("rate_after", ceiling[2] * 1e9) / 1e9
        movies_s = (ceiling[2] + after) / 2 / ceiling[1]  # at the mean of the rates before and after the levels
        print(f"compute ceiling: {movies_s:.1f} movies/s ({ceiling[1]:.2f} GFLOP a movie, the mean of 32 of the movies "
              f"sent, at {(ceiling[2] + after) / 2:.0f} GFLOP/s: fp32 2048³ matmul on {os.cpu_count()} threads, "
              f"{ceiling[2]:.0f} before the app started and {after:.0f} after it stopped); at {rows[-1]['callers']} "
              f"callers of {rows[-1]['batch']} movies a call the app reaches {rows[-1]['rps'] / movies_s:.2f} of it")
    print("\n| callers | movies a call | calls | movies/s | errors | p50 ms a call | p95 ms | p99 ms | server CPU ms/movie "
          "| callers CPU ms/movie | bad refused with a message | bad answered or unexplained |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['callers']} | {r['batch']} | {r['ok']} | {r['rps']:.1f} | {r['errors']} | {r['p50']:.0f} "
              f"| {r['p95']:.0f} | {r['p99']:.0f} | {r['server_ms']:.0f} | {r['client_ms']:.0f} | {r['bad_refused']} "
              f"| {r['bad_wrong']} |")
    if any(r["explain_callers"] for r in rows):
        print("\n| callers | explain callers | explanations | explain errors | explain p50 ms |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['callers']} | {r['explain_callers']} | {r['explained']} | {r['explain_errors']} "
                  f"| {r['explain_p50']:.0f} |")
    for f in result.get("flood", []):
        print_flood(f)
    if result.get("stages"):
        print_stages(result["stages"])
    print(f"\nserver peak memory (VmHWM): {peak:.0f} MB" if peak else "\nserver peak memory: unknown (pass --server-pid)")
    for r in rows:
        if r["first_error"]:
            print(f"first error at {r['callers']} callers: {r['first_error'][:300]}")
        if r["first_explain_error"]:
            print(f"first explain error at {r['callers']} callers: {r['first_explain_error'][:300]}")


if __name__ == "__main__":
    main()
