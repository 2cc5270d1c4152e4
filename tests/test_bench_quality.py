"""benchmarks/bench_quality.py on a tiny dataset and tiny towers: every row, mean ± sd over seeds, the bars."""

from __future__ import annotations

import importlib.util

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO_ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_seeds_of_two_candidates_give_every_row_and_the_bars(tmp_path, capsys):
    bench = load_bench()
    data = build_dataset(tmp_path, n=60)
    out = tmp_path / "bench"
    overrides = [o for o in tiny_overrides(data, out / "unused", train__epochs=1)
                 if not o.startswith(("data.path=", "train.output_dir="))]
    args = ["--data", str(data), "--out", str(out), "--seeds", "1,2", "--cold", *overrides]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    for candidate in ("quality", "fast"):
        for row in (f"| {candidate} fused |", f"| {candidate} plot only |", f"| {candidate} fused, movies with both inputs |",
                    f"| {candidate} fused given only the plot |", f"{candidate} fused micro-F1 >= 0.68",
                    f"{candidate} fused given only the plot within 0.02 micro-F1 of plot-only"):
            assert row in printed, row
        for seed in (1, 2):
            for model in ("fusion", "text"):
                assert (out / candidate / model / f"seed-{seed}" / "metrics.json").is_file()
    assert "| poster only |" in printed and "| poster only, movies with both inputs |" in printed
    assert printed.count("| poster only |") == 2  # one shared poster model: a score row and a time row
    assert "±" in printed and "over 2 seed(s) [1, 2]" in printed
    assert printed.count("(cold)") == 5  # the first seed of each of the 5 models
    assert all((out / "image" / f"seed-{seed}" / "metrics.json").is_file() for seed in (1, 2))

    # --reuse reports the finished runs without training again
    assert bench.main([*args[:-len(overrides)], "--reuse", *overrides]) == 0
    assert "reused" in capsys.readouterr().out
