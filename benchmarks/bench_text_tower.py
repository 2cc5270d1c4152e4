"""The text tower alone, side by side in one run: torch eager fp32, torch with oneDNN bf16 autocast, ONNX Runtime fp32.

    python benchmarks/bench_text_tower.py                                  # runs/fusion/model, 256 real plots
    python benchmarks/bench_text_tower.py --model runs/fusion/model --plots 256 --batch-size 32 --threads 2

Plots are real TMDb plots (../shared/data/tmdb5000, composed with the bundle's text template) when present,
generated ones otherwise; tokenized as predicting does (padding to the longest plot of each batch). Each backend
runs the plots in batches of --batch-size twice: in input order, and sorted by token length (what `mmgcs predict`
does within a window), so the padding's cost shows. ONNX Runtime is the serving fast path's session
(`mmgcs.fast_path.FastPath`, built and checked on the first batch; its build time is printed apart).

bf16 is timed on --bf16-plots plots only: without AVX512-BF16 / AMX, oneDNN emulates bf16 matmuls at a small
fraction of the fp32 rate, and 256 plots would take hours. The machine's fp32 and bf16 matmul GFLOP/s are printed
beside the figures so a reader sees why, and `× arithmetic` = time / (FLOPs at the fp32 matmul rate), 1.0 being
the compute ceiling. The machine's load average is printed too: other processes slow every figure.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_profile  # noqa: E402  (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MMGCS_SHARED_DATA", REPO.parent / "shared" / "data"))


def real_plots(n: int) -> tuple[list[tuple[str, str]], str]:
    """(title, plot) of the first `n` movies with a plot."""
    source = SHARED / "tmdb5000" / "movies.jsonl"
    if not source.is_file():
        words = "a young detective must stop a gang of thieves before the city falls".split()
        return [(f"Movie {i}", " ".join(words * (1 + i % 6))) for i in range(n)], "generated plots"
    rows = []
    with source.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("plot"):
                rows.append((row.get("title") or "", row["plot"]))
            if len(rows) >= n:
                break
    return rows, f"real TMDb plots from {source.parent}"


def matmul_rate_bf16(threads: int, n: int = 512) -> float:
    """bf16 FLOP/s of an n³ matmul, the best of 2 after a warm-up call (emulated bf16 is slow: n is small)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * n ** 3 / best
    finally:
        torch.set_num_threads(saved)


def batches(model, texts: list[str], size: int, by_length: bool) -> list[tuple]:
    from mmgcs.models.preprocessing import tokenize

    tokenizer = model.tokenizer
    order = list(range(len(texts)))
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=model.config.max_text_length)["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    out = []
    for start in range(0, len(order), size):
        enc = tokenize(tokenizer, model.config, [texts[i] for i in order[start:start + size]])
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def timed(encode, chunks: list[tuple]) -> tuple[float, int, int]:
    """(seconds, tokens incl. padding, real tokens) of `encode` over every batch."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in chunks:
            encode(ids, mask)
    seconds = time.perf_counter() - start
    return seconds, sum(ids.numel() for ids, _ in chunks), sum(int(mask.sum()) for _, mask in chunks)


def flops_per_token(model, chunk: tuple) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ids, mask = chunk
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.encode_text(ids, mask)
    return counter.get_total_flops() / ids.numel()


def bf16_encoder(model):
    import torch

    def encode(ids, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode_text(ids, mask)
    return encode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "runs" / "fusion" / "model"), help="bundle folder or Hub id")
    parser.add_argument("--plots", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0 = torch's default)")
    parser.add_argument("--bf16-plots", type=int, default=2, help="plots timed under bf16 autocast (slow without native bf16)")
    args = parser.parse_args(argv)

    import torch

    from mmgcs import GenreClassifier
    from mmgcs.fast_path import FastPath
    from mmgcs.inference import composed_plots
    from mmgcs.serving import cpu_has_native_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = GenreClassifier.from_pretrained(args.model).eval()
    rows, origin = real_plots(args.plots)
    texts = composed_plots(model, [p for _, p in rows], [t for t, _ in rows])
    fp32 = bench_profile.matmul_rate(threads)
    bf16 = matmul_rate_bf16(threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"text tower {model.config.text_backbone}; {len(texts)} {origin}; batch {args.batch_size}; {threads} "
          f"thread(s) on {os.cpu_count()} cores; native bf16 (AVX512-BF16/AMX): {cpu_has_native_bf16()}")
    print(f"matmul on {threads} thread(s): fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.2f} GFLOP/s "
          f"({bf16 / fp32:.3f}x fp32); load average {load} (a shared machine: other processes slow every figure)\n")
    sorted_chunks = batches(model, texts, args.batch_size, by_length=True)
    per_token = flops_per_token(model, sorted_chunks[0])
    fast = FastPath(model)
    start = time.perf_counter()
    with torch.inference_mode():
        fast.encode_text(*sorted_chunks[0])  # export + session + the eager check
    build_s = time.perf_counter() - start
    if fast.text_kind() != "onnxruntime":
        print("ONNX Runtime unavailable (see the log line above): its rows time the eager tower")
    rows_out = []
    for order, chunks in (("input order", batches(model, texts, args.batch_size, False)), ("by length", sorted_chunks)):
        for name, encode in (("torch eager fp32", model.encode_text), ("onnxruntime fp32", fast.encode_text)):
            rows_out.append(row(name, order, len(texts), *timed(encode, chunks), per_token, fp32))
    few = batches(model, texts[:args.bf16_plots], args.batch_size, by_length=True)
    rows_out.append(row("torch oneDNN bf16 autocast", "by length", args.bf16_plots, *timed(bf16_encoder(model), few),
                        per_token, fp32))
    print_table(["backend", "batches", "plots", "s", "plots/s", "tokens/plot padded (real)", "× arithmetic"], rows_out)
    real = sum(int(mask.sum()) for _, mask in sorted_chunks) / len(texts)
    print(f"\n{per_token / 1e6:.0f} MFLOP a token, {real:.0f} real tokens a plot: {real * per_token / 1e9:.1f} GFLOP a "
          f"plot, so the fp32 ceiling here is {fp32 / (real * per_token):.1f} plots/s on {threads} thread(s)")
    print(f"ONNX Runtime session built and checked in {build_s:.1f} s (once a process); load average after: "
          + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


def row(name: str, order: str, plots: int, seconds: float, padded: int, real: int, per_token: float,
        rate: float) -> tuple:
    """× arithmetic: the time over that of the real tokens' FLOPs at the fp32 matmul rate (padding is waste)."""
    arithmetic = real * per_token / rate
    return (name, order, plots, f"{seconds:.1f}", f"{plots / seconds:.2f}", f"{padded / plots:.0f} ({real / plots:.0f})",
            f"{seconds / arithmetic:.2f}")


def print_table(header: list[str], rows: list[tuple]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
