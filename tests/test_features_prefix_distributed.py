"""Partial text fine-tuning from the cached prefix (mmgcs/features/prefix.py) across processes and machines, and the
bundle it makes where nothing of the run is left.

Data parallel (gloo over loopback, CPU only; `accelerate launch` as in tests/test_multinode.py, whose helpers these
tests import): 2 processes on one machine, 2 machines of 2 processes with their own cache folders, and 2 machines of
1 process sharing one. On each machine its first process computes the prefixes while the others wait, then they
read them (a shared folder: the entry's lock lets one machine compute each prefix, the other waits and reads it);
every run ends with the replicas in sync and where the one-process run with the same global batch ends (losses and
probabilities within 1e-6: the all-reduce sums in another order; the metrics equal). That takes the tuned layers
without dropout (the tiny BERT's is 0.1): a dropout mask is drawn from each process's own random stream, so with it a
run on N processes is another draw of the same training, not the one-process run's.

Serving: a bundle whose text tower's top layer was tuned from the prefix loads with no cache left, the fast path's
ONNX export of its text tower gives the eager scores within 1e-4, and explanations and `mmgcs predict` work on it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file

from engine_helpers import GENRES, REPO_ROOT, build_dataset, split_sizes, subprocess_env, tiny_bundle, tiny_overrides
from test_multinode import (GLOBAL_BATCH, SCRIPT, TIMEOUT_S, _free_port, _launch_env, _settings, assert_same_run,
                            cache_report, entries, run_two_machines, training_output)

from mmgcs.prefix_loaders import LengthGroupedBatches
from mmgcs.testing import tiny_text_backbone_dir

INPUTS = "text_prefix+image_features"  # the text tower's top layer from the prefix, the frozen poster tower's features
PREFIXES = 3  # train / validation / test
TOP = ".layer.1."  # the tiny BERT's last of 2 layers: the one text_trainable_layers=1 tunes


def prefix_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("text_prefix-*.safetensors"))


def without_dropout(folder: Path) -> Path:
    """The tiny test BERT (tokenizer and weights) with its dropout off."""
    shutil.copytree(tiny_text_backbone_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tuning(backbone: Path) -> tuple[str, ...]:
    """Settings (after test_multinode's) that tune the text tower's last layer from the cached prefix."""
    return ("train.text_finetune=partial", "train.text_trainable_layers=1", "train.backbone_lr=0.01",
            f"model.text_backbone={backbone}")


def launch_one_machine(dataset: Path, out: Path, cache: Path, processes: int, extra: tuple) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           SCRIPT, *_settings(dataset, out, cache, GLOBAL_BATCH // processes), *extra]
    proc = subprocess.run(cmd, env=_launch_env(out.parent), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in training_output(log), log[-4000:]
    return log


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The dataset (a train split of 56 rows: 7 global batches of 8), the one-process run tuning the top layer from
    the prefix, and the settings it used."""
    root = tmp_path_factory.mktemp("prefix-ddp")
    dataset = build_dataset(root / "build", n=70)
    assert split_sizes(dataset)["train"] % GLOBAL_BATCH == 0
    extra = tuning(without_dropout(root / "backbone"))
    out = root / "one-process"
    proc = subprocess.run([sys.executable, SCRIPT, *_settings(dataset, out, root / "one-process-cache", GLOBAL_BATCH),
                           *extra], env=_launch_env(root), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert 0 < json.loads((out / "metrics.json").read_text())["test"]["micro_f1"] < 1  # a task that tells runs apart
    assert len(prefix_entries(root / "one-process-cache")) == PREFIXES
    return dataset, out, extra


def without_key_bias(name: str, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` less the attention keys' biases. Their gradient is zero in exact arithmetic (a key bias adds the
    same number to every score of a query, which the softmax takes away): what they get is rounding noise, which
    Adam's normalized step turns into moves of the learning rate's size (1.6e-3 after 2 epochs) that change no
    output, so they differ between runs that sum in another order. (Other weights with gradients near zero move by
    up to ~1e-5 so: the weights are compared to 1e-4, the outputs to 1e-6.)"""
    if name.endswith("attention.self.key.bias"):  # BERT's
        return weights[:0]
    if name.endswith("in_proj_bias"):  # torch's MultiheadAttention: query, key and value biases in one
        width = len(weights) // 3
        return torch.cat([weights[:width], weights[2 * width:]])
    return weights


def assert_same_tuned_model(out: Path, reference: Path) -> None:
    """``out`` tuned the text tower's top layer (in the optimizer, kept by its checkpoints) to the reference's."""
    from mmgcs import GenreClassifier

    model = GenreClassifier.from_pretrained(out / "model")
    top = sum(p.numel() for p in model.text_tower.backbone.encoder.layer[-1].parameters())
    towers = ("text_tower.", "image_tower.")
    head = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(towers))
    assert {r["trainable_parameters"] for r in json.loads((out / "history.json").read_text())} == {head + top}
    bundle, expected = (load_file(d / "model" / "model.safetensors") for d in (out, reference))
    assert bundle.keys() == expected.keys()
    for key in bundle:
        torch.testing.assert_close(*(without_key_bias(key, w[key]) for w in (bundle, expected)), atol=1e-4, rtol=0,
                                   msg=lambda problem, key=key: f"{key}: {problem}")
    checkpoints = list((out / "checkpoints").glob("epoch_*"))  # the best epoch's and the last one's
    assert checkpoints
    for checkpoint in checkpoints:  # the tuned layer, and none of the frozen ones
        kept = {k for k in load_file(checkpoint / "model.safetensors") if k.startswith("text_tower.")}
        assert kept == {k for k in bundle if k.startswith("text_tower.") and TOP in k}


# ------------------------------------------------------------------------------------------------ data parallel
def test_on_several_processes_a_step_sees_the_rows_of_one_process_with_the_global_batch():
    """Accelerate deals each process the next batch in turn: the batches of 2 processes x 4 rows, step by step, are
    the batches of 8 rows that one process takes (so both train the same model), grouped by length alike."""
    lengths = torch.randint(3, 129, (1000,), generator=torch.Generator().manual_seed(0))
    one = LengthGroupedBatches(lengths, batch_size=8, seed=42)
    two = LengthGroupedBatches(lengths, batch_size=4, seed=42, processes=2)
    assert len(two) == 2 * len(one)
    for epoch in (0, 3):
        one.sampler.set_epoch(epoch)
        two.sampler.set_epoch(epoch)
        shards = [list(BatchSamplerShard(two, num_processes=2, process_index=i)) for i in (0, 1)]
        steps = [a + b for a, b in zip(*shards)]
        assert steps == list(one) and all(len(a) == len(b) == 4 for a, b in zip(*shards))
    single = LengthGroupedBatches(lengths, batch_size=4, seed=42)  # one process alone: batches of its own size
    assert sorted(sum(list(single), [])) == list(range(1000)) and list(single) != list(two)


@pytest.mark.slow
def test_two_processes_read_the_prefix_their_first_computed_and_end_like_one_process(tmp_path, one_process):
    dataset, reference, extra = one_process
    out, cache = tmp_path / "run", tmp_path / "cache"
    log = launch_one_machine(dataset, out, cache, processes=2, extra=extra)
    assert cache_report(log, "Text prefix cache") == [(0, 0, str(cache), PREFIXES, 0), (1, 1, str(cache), 0, PREFIXES)]
    assert prefix_entries(cache) == prefix_entries(reference.parent / "one-process-cache")
    assert_same_run(out, reference, processes=2, inputs=INPUTS)
    assert_same_tuned_model(out, reference)


@pytest.mark.slow
def test_two_machines_each_compute_their_own_prefix_cache_once(tmp_path, one_process):
    """Two processes a machine, each machine with its own cache folder: on each machine its first process computes
    the prefixes (local_main_process_first) while its second waits, then reads them from that machine's disk."""
    dataset, reference, extra = one_process
    out = tmp_path / "shared" / "run"
    logs = run_two_machines(tmp_path, dataset, out, cache_of=lambda node: node / "cache", processes=4, extra=extra)
    caches = [str(tmp_path / f"machine{rank}" / "cache") for rank in (0, 1)]
    assert cache_report(logs[0], "Text prefix cache") == [
        (0, 0, caches[0], PREFIXES, 0), (1, 1, caches[0], 0, PREFIXES),
        (2, 0, caches[1], PREFIXES, 0), (3, 1, caches[1], 0, PREFIXES)]
    for folder in caches:  # the one-process run's entries (the poster features and the prefixes), on each disk
        assert entries(Path(folder)) == entries(reference.parent / "one-process-cache")
    assert_same_run(out, reference, processes=4, inputs=INPUTS)
    assert_same_tuned_model(out, reference)


@pytest.mark.slow
def test_two_machines_sharing_one_cache_folder_compute_each_prefix_once(tmp_path, one_process):
    """One process a machine, one cache folder for both (an NFS mount): both machines' first processes look for the
    prefixes at once; the entry's lock lets one compute each, written whole and renamed into place, and the other
    waits and reads it."""
    dataset, reference, extra = one_process
    shared = tmp_path / "nfs"
    out = shared / "run"
    logs = run_two_machines(tmp_path, dataset, out, cache_of=lambda node: shared / "cache", processes=2, extra=extra)
    assert entries(shared / "cache") == entries(reference.parent / "one-process-cache")
    assert not list((shared / "cache").glob(".tmp-*"))
    report = cache_report(logs[0], "Text prefix cache")
    assert [(p, local, folder) for p, local, folder, _, _ in report] == [(0, 0, str(shared / "cache")),
                                                                        (1, 0, str(shared / "cache"))]
    assert sum(computed for *_, computed, _ in report) == PREFIXES  # each prefix computed once, on either machine
    assert sum(read for *_, read in report) == PREFIXES
    assert_same_run(out, reference, processes=2, inputs=INPUTS)
    assert_same_tuned_model(out, reference)


# ------------------------------------------------------------------------------------------ the tuned bundle served
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(the bundle of a run that tuned the text tower's top layer from the prefix, the bundle it started from, the
    dataset); the run's cache is gone."""
    from mmgcs.engine import main

    root = tmp_path_factory.mktemp("prefix-serving")
    movies = build_dataset(root / "data", n=45, poster_every=2, plot_every=3)
    start = tiny_bundle(root / "start", lexical=True, lexical_features=2048, lexical_min_df=1)
    cache, out = root / "cache", root / "run"
    main(tiny_overrides(movies, out, train__epochs=1, train__cache_dir=cache, train__init_from=start,
                        train__text_finetune="partial", train__text_trainable_layers=1, train__backbone_lr=0.01),
         default_config=REPO_ROOT / "configs" / "fusion.yaml")
    assert json.loads((out / "history.json").read_text())[0]["inputs"] == INPUTS
    assert len(prefix_entries(cache)) == PREFIXES
    shutil.rmtree(cache)
    return out / "model", start, movies


def _views(predictor, plots, posters, titles) -> dict:
    probs, views = predictor.probabilities(plots, posters, titles, by_modality=True)
    return {name: p for name, (p, _) in views.items()}


@pytest.mark.slow
def test_the_tuned_bundle_loads_alone_and_its_onnx_text_tower_scores_like_the_eager_one(tuned):
    from mmgcs import GenreClassifier
    from mmgcs.fast_path import import_onnxruntime
    from mmgcs.inference import Predictor

    import_onnxruntime()  # the optional extra mmgcs[fast], installed with the dev extras
    bundle, start, movies = tuned
    model, before = GenreClassifier.from_pretrained(bundle), load_file(start / "model.safetensors")
    after = model.state_dict()
    changed = {k for k in before if k.startswith("text_tower.") and not torch.equal(before[k], after[k])}
    assert changed and all(TOP in k for k in changed)  # the tuned layer is what the export must carry

    rows = _rows(movies, "test")
    eager, fast = Predictor(model), Predictor(model, fast=True)
    expected, got = _views(eager, *rows), _views(fast, *rows)
    assert fast.fast.text_kind() == "onnxruntime" and fast.fast.image_kind() == "torchscript-frozen"
    assert expected.keys() == got.keys() == {"fused", "text", "image"}
    for name in expected:
        assert (expected[name] - got[name]).abs().max().item() <= 1e-4, name
    untuned = _views(Predictor(GenreClassifier.from_pretrained(start)), *rows)["text"]
    assert (untuned - expected["text"]).abs().max().item() > 1e-3  # the tuned layer changed the plot's scores

    plot, poster, title = next(row for row in zip(*_rows(movies, "train")) if row[0] and row[1] is not None)
    why, fast_why = (p.explain(plot=plot, poster=poster, title=title, genres=GENRES) for p in (eager, fast))
    for genre in GENRES:  # the words, the plot/poster share and the occlusion map behind each genre, fast as eager
        want, entry = why["genres"][genre], fast_why["genres"][genre]
        assert entry["score"] == pytest.approx(want["score"], abs=1e-4)
        assert entry["plot_effect"] == pytest.approx(want["plot_effect"], abs=1e-3)
        assert entry["lexical"]["up"] + entry["lexical"]["down"] == want["lexical"]["up"] + want["lexical"]["down"]
        assert entry["lexical"]["up"] + entry["lexical"]["down"]
        np.testing.assert_allclose(entry["occlusion"], want["occlusion"], atol=1e-4)


def _rows(movies: Path, split: str) -> tuple[list, list, list]:
    from datasets import Image

    from mmgcs.data import load_movies

    data = load_movies(movies)[split].cast_column("poster", Image(decode=False))
    return list(data["plot"]), list(data["poster"]), list(data["title"])


@pytest.mark.slow
def test_mmgcs_predict_with_the_fast_path_and_explanations_serves_the_tuned_bundle(tuned, tmp_path):
    from mmgcs import GenreClassifier
    from mmgcs.inference import Predictor

    bundle, _, movies = tuned
    out = tmp_path / "preds.jsonl"
    run = subprocess.run([sys.executable, "-m", "mmgcs", "predict", "--model", str(bundle), "--input", str(movies),
                          "--split", "test", "--out", str(out), "--fast", "--explain"],
                         env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    plots, posters, titles = _rows(movies, "test")
    assert len(lines) == len(plots) and not any(line.get("error") for line in lines)
    expected = Predictor(GenreClassifier.from_pretrained(bundle)).predict_batch(plots, posters, titles=titles)
    for line, want in zip(lines, expected):
        assert np.allclose([line[g] for g in GENRES], [want["scores"][g] for g in GENRES], atol=1e-4, rtol=0)
        assert line["explanation"] is not None and set(line["explanation"]["genres"]) == set(want["genres"])
