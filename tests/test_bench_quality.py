"""benchmarks/bench_quality.py on a tiny dataset and tiny towers: every row, mean ± sd over seeds, the bars."""

from __future__ import annotations

import importlib.util

from engine_helpers import REPO_ROOT, build_dataset, tiny_overrides


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO_ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_seeds_of_three_models_give_every_row_and_the_bars(tmp_path, capsys):
    bench = load_bench()
    data = build_dataset(tmp_path, n=60)
    out = tmp_path / "bench"
    overrides = [o for o in tiny_overrides(data, out / "unused", train__epochs=1)
                 if not o.startswith(("data.path=", "train.output_dir="))]
    assert bench.main(["--data", str(data), "--out", str(out), "--seeds", "1,2", *overrides]) == 0
    printed = capsys.readouterr().out
    for row in ("| fusion |", "| text |", "| image |", "| fusion, movies with both inputs |",
                "| fusion given only the plot |", "fused micro-F1 >= 0.68", "within 0.02 micro-F1 of plot-only"):
        assert row in printed, row
    assert "±" in printed and "over 2 seed(s) [1, 2]" in printed
    for model in ("fusion", "text", "image"):
        for seed in (1, 2):
            assert (out / model / f"seed-{seed}" / "metrics.json").is_file()

    # --reuse reports the finished runs without training again
    assert bench.main(["--data", str(data), "--out", str(out), "--seeds", "1,2", "--reuse", *overrides]) == 0
    assert "reused" in capsys.readouterr().out
