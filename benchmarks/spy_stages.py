"""py-spy raw (collapsed) stacks of the app server -> a table of its CPU samples per stage (issue 12).

    python benchmarks/bench_app_load.py --model runs/fusion/model --callers 1 --seconds 30 &   # then, its app pid:
    py-spy record --pid APP_PID --duration 15 --rate 200 --format raw --nonblocking -o /tmp/app.txt
    python benchmarks/spy_stages.py /tmp/app.txt

Each sample goes to the first MMGCS, app or Gradio frame from the leaf up (library frames belong to their caller).
py-spy samples threads that are running, so time a thread spends waiting (epoll, locks) is not counted.
"""
import sys
from collections import Counter
RULES = [
    ("text tower (ONNX Runtime)", ("mmgcs/fast_path.py", "encode_text")),
    ("image tower (TorchScript)", ("mmgcs/models/image_fast.py", "encode_image")),
    ("fusion head ×3 + probabilities", ("mmgcs/models/fusion.py", "mmgcs/models/classifier.py", "mmgcs/models/lexical.py:logits")),
    ("tokenize", ("mmgcs/models/preprocessing.py",)),
    ("lexical n-grams", ("mmgcs/models/lexical.py",)),
    ("poster decode (upload checks + PIL)", ("mmgcs/data/images.py", "mmgcs/uploads.py")),
    ("resize + to tensor + normalize", ("_images (",)),
    ("predict glue (validate, batch dict, views, results, json)", ("mmgcs/",)),
    ("app handler (app.py)", ("/app.py",)),
    ("Gradio / HTTP (queue, files, JSON, uvicorn, asyncio)", ("gradio", "uvicorn", "starlette", "fastapi", "anyio", "httpx", "h11", "asyncio", "pydantic", "multipart", "safehttpx")),
]
counts = Counter()
total = 0
for line in open(sys.argv[1], encoding="utf-8"):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n); total += n
    stage = "other (threading, GC, ...)"
    for frame in stack.split(";")[::-1]:
        hit = next((name for name, keys in RULES if any(k in frame for k in keys)), None)
        if hit:
            stage = hit
            break
    counts[stage] += n
print("| stage (app, py-spy, server process) | share of CPU samples |\n|---|---|")
for stage, n in counts.most_common():
    print(f"| {stage} | {n / total:.0%} |")
print(f"| total samples | {total} |")
