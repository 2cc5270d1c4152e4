"""The training loop end to end on tiny towers and a tiny built dataset (CPU, seconds per run)."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine_helpers import GENRES, REPO_ROOT, build_dataset, split_sizes, tiny_bundle, tiny_overrides

from mmgcs.engine import latest_checkpoint, main
from mmgcs.processor import GenreProcessor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Odd split sizes on purpose: batches do not divide them evenly.
    return build_dataset(tmp_path_factory.mktemp("engine-data"), n=45, poster_every=1, plot_every=1)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Some movies without a poster, some without a plot (like the real data)."""
    return build_dataset(tmp_path_factory.mktemp("engine-mixed"), n=40, poster_every=2, plot_every=3)


overrides = tiny_overrides


def run_script(monkeypatch, name: str, args: list[str]):
    script = REPO_ROOT / "training" / name
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize(
    "script, towers",
    [("train_text.py", ("text",)), ("train_image.py", ("image",)), ("train_fusion.py", ("text", "image"))],
)
def test_each_script_two_steps_leaves_a_loadable_bundle_and_metrics(monkeypatch, tmp_path, data, script, towers):
    from mmgcs import GenreClassifier

    out = tmp_path / "run"
    run_script(monkeypatch, script, overrides(data, out, train__epochs=1, train__max_steps=2))

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and history[0]["step"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    sizes = split_sizes(data)
    assert metrics["test"]["n_samples"] == sizes["test"]  # every test movie scored exactly once
    assert metrics["validation"]["n_samples"] == sizes["validation"]
    assert set(metrics["test"]["per_genre"]) == set(GENRES)
    for key in ("micro_f1", "macro_f1", "mAP"):
        assert 0.0 <= metrics["test"][key] <= 1.0

    model = GenreClassifier.from_pretrained(out / "model")
    assert model.labels == GENRES
    assert (model.text_tower is not None, model.image_tower is not None) == ("text" in towers, "image" in towers)
    assert model.config.thresholds is not None and len(model.config.thresholds) == len(GENRES)
    # The saved bundle holds the weights the test metrics were computed with.
    preds = torch.from_numpy(__import__("numpy").load(out / "test_predictions.npz")["probs"])
    from mmgcs.data import load_movies
    from mmgcs.models.preprocessing import compose_text

    test = load_movies(data)["test"]
    with torch.no_grad():
        # The bundle's text_template (the configs read "{title}. {plot}") is part of the model's input.
        texts = [compose_text(model.config.text_template, p, t) for p, t in zip(test["plot"], test["title"])]
        batch = GenreProcessor.from_model(model)(texts, [r["poster"] for r in test.cast_column("poster", __import__("datasets").Image(decode=False))])
        probs = model.probabilities(model(**batch)["logits"])
    torch.testing.assert_close(probs, preds.float(), atol=1e-5, rtol=1e-4)

    card = (out / "model" / "README.md").read_text()
    assert "model-index" in card and "library_name: mmgcs" in card
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["data"]["path"] == str(data)
    for png in ("training_curves.png", "per_genre_f1.png"):
        assert (out / png).stat().st_size > 0
    assert latest_checkpoint(out).name == "epoch_001"


def test_push_to_hub_offline_fails_clearly_after_everything_is_saved(monkeypatch, tmp_path, data, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--push-to-hub", "someone/genres", *overrides(data, out, train__epochs=1, train__max_steps=1)],
             default_config=REPO_ROOT / "configs" / "text.yaml")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "someone/genres" in err and "Everything is saved" in err and str(out) in err
    assert (out / "model" / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_two_stage_schedule_trains_the_head_first_then_the_tower(tmp_path, data):
    out = tmp_path / "run"
    bundle = tiny_bundle(tmp_path / "start", image=False)
    start = load_file(bundle / "model.safetensors")
    main(overrides(data, out, train__init_from=bundle, train__epochs=2, train__freeze_epochs=1,
                   train__text_finetune="full", train__backbone_lr=0.005, train__early_stopping_patience=0),
         default_config=REPO_ROOT / "configs" / "text.yaml")
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    # A separate learning rate for the backbone, reported per parameter group.
    lrs = history[0]["lr"]
    assert lrs["backbone"] == pytest.approx(0.5 * lrs["head"]) and lrs["head"] > 0
    final = load_file(latest_checkpoint(out) / "model.safetensors")
    tower = [k for k in start if k.startswith("text_tower.")]
    head = [k for k in start if k.startswith("fusion.")]
    assert tower and head
    n_tower = sum(start[k].numel() for k in tower)
    # stage 1 trains the head only; stage 2 the tower too
    assert history[1]["trainable_parameters"] - history[0]["trainable_parameters"] == n_tower
    assert any(not torch.equal(start[k], final[k]) for k in tower), "the tower never trained in stage 2"
    assert any(not torch.equal(start[k], final[k]) for k in head)


def test_partial_finetuning_trains_only_the_last_layers(tmp_path, data):
    out = tmp_path / "run"
    bundle = tiny_bundle(tmp_path / "start", image=False)
    start = load_file(bundle / "model.safetensors")
    main(overrides(data, out, train__init_from=bundle, train__epochs=1, train__max_steps=2,
                   train__text_finetune="partial", train__text_trainable_layers=1, train__backbone_lr=0.01),
         default_config=REPO_ROOT / "configs" / "text.yaml")
    final = load_file(out / "model" / "model.safetensors")  # the one epoch's weights, all of them
    changed = {k for k in start if k.startswith("text_tower.") and not torch.equal(start[k], final[k])}
    assert changed and all(".layer.1." in k for k in changed), sorted(changed)
    # The checkpoint leaves out the tower's weights that do not train, and only those.
    left_out = set(start) - set(load_file(latest_checkpoint(out) / "model.safetensors"))
    assert left_out and not left_out & changed and all(k.startswith("text_tower.") for k in left_out)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path, data):
    out = tmp_path / "run"
    # A learning rate too small to move any prediction: the validation metric can never improve.
    metrics = main(overrides(data, out, train__epochs=5, train__lr=1e-12, train__early_stopping_patience=1,
                             train__metric_for_best="micro_f1", train__scheduler="none"),
                   default_config=REPO_ROOT / "configs" / "text.yaml")
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and metrics["epochs_run"] == 2 and metrics["best_epoch"] == 1
    # best + latest kept, older ones pruned
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_001", "epoch_002"]


def test_only_best_and_latest_checkpoints_are_kept(tmp_path, data):
    out = tmp_path / "run"
    main(overrides(data, out, train__epochs=3, train__early_stopping_patience=0, train__metric_for_best="loss"),
         default_config=REPO_ROOT / "configs" / "text.yaml")
    metrics = json.loads((out / "metrics.json").read_text())
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"epoch_{metrics['best_epoch']:03d}", "epoch_003"})


def test_rows_without_any_input_of_the_model_are_skipped_and_reported(tmp_path, mixed_data, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        metrics = main(overrides(mixed_data, out, train__epochs=1, train__max_steps=1),
                       default_config=REPO_ROOT / "configs" / "image.yaml")
    sizes = split_sizes(mixed_data)
    assert metrics["rows"]["train"] < sizes["train"]
    dropped = sizes["train"] - metrics["rows"]["train"]
    assert f"train: skipping {dropped} of {sizes['train']} rows with no poster" in caplog.text


def test_fused_model_reports_single_input_scores(tmp_path, mixed_data):
    out = tmp_path / "run"
    metrics = main(overrides(mixed_data, out, train__epochs=1, train__max_steps=2),
                   default_config=REPO_ROOT / "configs" / "fusion.yaml")
    single = metrics["test_single_input"]
    assert set(single) == {"text_only", "image_only"}
    import numpy as np

    saved = np.load(out / "test_predictions.npz")
    assert single["text_only"]["n_samples"] == int(saved["has_text"].sum())
    assert single["image_only"]["n_samples"] == int(saved["has_image"].sum())
    assert metrics["test"]["n_samples"] == split_sizes(mixed_data)["test"]


def test_user_errors_exit_with_a_message(tmp_path, data, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(overrides(tmp_path / "no-such-dataset", out))
    assert e.value.code == 2 and "mmgcs.data build" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        main(overrides(data, out, train__optimizer="lion"))
    assert e.value.code == 2 and "adamw" in capsys.readouterr().err

    bundle = tiny_bundle(tmp_path / "other-labels", labels=["Action", "Cooking"])
    with pytest.raises(SystemExit) as e:
        main(overrides(data, out, train__init_from=bundle))
    assert e.value.code == 2 and "Cooking" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = overrides(data, out, train__epochs=1, train__max_steps=1)
    main(args, default_config=REPO_ROOT / "configs" / "text.yaml")
    with pytest.raises(SystemExit) as e:
        main(args, default_config=REPO_ROOT / "configs" / "text.yaml")
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    # --resume of a finished run re-evaluates the best model instead of training again
    metrics = main([*args, "--resume"], default_config=REPO_ROOT / "configs" / "text.yaml")
    assert metrics["epochs_run"] == 1


def test_frozen_towers_train_on_cached_features_computed_once(tmp_path, data, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="mmgcs.features"):
        first = main(overrides(data, tmp_path / "a", train__epochs=2, train__cache_dir=cache),
                     default_config=REPO_ROOT / "configs" / "fusion.yaml")
    assert caplog.text.count("Feature cache miss") == 6 and "Feature cache hit" not in caplog.text  # 2 towers x 3 splits
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["inputs"] for h in history] == ["features", "features"]
    caplog.clear()
    with caplog.at_level("INFO", logger="mmgcs.features"):
        second = main(overrides(data, tmp_path / "b", train__epochs=2, train__cache_dir=cache),
                      default_config=REPO_ROOT / "configs" / "fusion.yaml")
    assert caplog.text.count("Feature cache hit") == 6 and "Feature cache miss" not in caplog.text
    assert second["test"] == first["test"]  # same seed, same features: the same model
    caplog.clear()
    with caplog.at_level("INFO", logger="mmgcs.features"):  # a text-only model reuses the fused model's text features
        main(overrides(data, tmp_path / "c", train__epochs=1, train__cache_dir=cache),
             default_config=REPO_ROOT / "configs" / "text.yaml")
    assert caplog.text.count("Feature cache hit: text") == 3 and "Feature cache miss" not in caplog.text


def test_uncached_frozen_towers_give_the_same_model_as_cached_ones(tmp_path, data):
    cached = main(overrides(data, tmp_path / "a", train__epochs=1, model__modality_dropout=0.0),
                  default_config=REPO_ROOT / "configs" / "text.yaml")
    raw = main(overrides(data, tmp_path / "b", train__epochs=1, model__modality_dropout=0.0,
                         train__cache_features="false"),
               default_config=REPO_ROOT / "configs" / "text.yaml")
    assert json.loads((tmp_path / "b" / "history.json").read_text())[0]["inputs"] == "raw"
    assert raw["test"]["micro_f1"] == pytest.approx(cached["test"]["micro_f1"], abs=1e-6)
    assert raw["test"]["mAP"] == pytest.approx(cached["test"]["mAP"], abs=1e-4)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, data):
    out = tmp_path / "run"
    main(overrides(data, out, train__epochs=1, train__batch_size=4, train__grad_accum_steps=2),
         default_config=REPO_ROOT / "configs" / "text.yaml")
    batches = -(-split_sizes(data)["train"] // 4)
    assert json.loads((out / "history.json").read_text())[0]["step"] == -(-batches // 2)


def test_fast_profile_and_limit_use_the_first_rows_of_each_split(tmp_path, data):
    out = tmp_path / "run"
    metrics = main(["--fast", *overrides(data, out, train__limit=20, train__max_steps=1)],
                   default_config=REPO_ROOT / "configs" / "text.yaml")
    sizes = split_sizes(data)
    assert metrics["rows"] == {role: min(20, n) for role, n in sizes.items()}
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2  # from the --fast profile


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from mmgcs.config import load_config
    from mmgcs.sweep import load_sweep

    if path.name == "sweep.yaml" or yaml.safe_load(path.read_text()).keys() & {"grid"}:
        sweep = load_sweep(path)
        assert all(b.is_file() for b in sweep.base)
        for point in __import__("mmgcs.sweep", fromlist=["grid_points"]).grid_points(sweep.grid):
            load_config(sweep.base, [f"{k}={v}" for k, v in point.items()])
    else:
        load_config([path])


@pytest.mark.parametrize(
    "config, script, extra",
    [
        ("seeds/bilstm-text.yaml", "train_text.py", {"model.word_embedding_dim": 8, "model.lstm_hidden_dim": 8,
                                                      "model.vocab_size": 200}),
        ("seeds/simplecnn-poster.yaml", "train_image.py", {"model.image_size": 32}),
    ],
)
def test_seed_systems_train_from_scratch(monkeypatch, tmp_path, data, config, script, extra):
    out = tmp_path / "run"
    args = ["--config", str(REPO_ROOT / "configs" / config),
            *overrides(data, out, train__epochs=1, train__max_steps=2, train__scheduler="none"),
            *[f"{k}={v}" for k, v in extra.items()]]
    run_script(monkeypatch, script, args)
    history = json.loads((out / "history.json").read_text())
    assert history[0]["inputs"] == "raw" and history[0]["lr"]["backbone"] > 0  # the tower itself trains
    from mmgcs import GenreClassifier

    model = GenreClassifier.from_pretrained(out / "model")
    tower = model.text_tower or model.image_tower
    assert history[0]["trainable_parameters"] > sum(p.numel() for p in model.fusion.parameters())
    assert tower is not None


def test_pos_weight_from_train_label_frequencies_is_saved_with_the_model(tmp_path, data):
    from mmgcs import GenreClassifier
    from mmgcs.data import load_movies

    out = tmp_path / "run"
    main(overrides(data, out, train__epochs=1, train__max_steps=1, train__pos_weight="sqrt"),
         default_config=REPO_ROOT / "configs" / "text.yaml")
    model = GenreClassifier.from_pretrained(out / "model")
    train = load_movies(data)["train"]
    n = len(train)
    for j, genre in enumerate(model.labels):
        positives = sum(j in ids for ids in train["genres"])
        assert model.config.pos_weight[j] == pytest.approx(min(10.0, max(1.0, (n - positives) / positives) ** 0.5), abs=1e-3)
    assert torch.equal(model.pos_weight, torch.tensor(model.config.pos_weight))
