"""A late-fusion model started from a trained plot model and a trained poster model (issue #4)."""

import pytest
import torch

from mmgcs import GenreClassifier
from mmgcs.models.init_from import TOWER_FIELDS, TOWER_TYPE_FIELDS, InitFromError, init_from_bundles, init_from_config
from mmgcs.testing import tiny_model, tiny_text_backbone_dir
from mmgcs.processor import GenreProcessor
from data_helpers import image_bytes

LABELS = ("Action", "Comedy", "Drama", "Horror")
PLOTS = ["a young detective must find the killer in the city", "two friends fall in love at school",
         "a monster lives in the dark forest", "the army fights a war on a distant planet"]


def posters():
    return [image_bytes(seed=i, size=(40, 60)) for i in range(len(PLOTS))]


def saved(tmp_path, name, **kwargs):
    model = tiny_model(**kwargs)
    with torch.no_grad():  # a trained head has biases far from 0, and different ones per model
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        "text": saved(root, "text", labels=LABELS, image=False, fusion="late", seed=1),
        # the poster model lists its genres in another order: mapped by name
        "image": saved(root, "image", labels=LABELS[::-1], text=False, fusion="late", seed=2),
        "text_gated": saved(root, "text_gated", labels=LABELS, image=False, fusion="gated", seed=3),
    }


def logits(model, plots=None, posters=None):
    model.eval()
    with torch.no_grad():
        return model(**GenreProcessor.from_model(model)(plots, posters))["logits"]


def by_name(model, values):
    """(B, L) logits → columns in LABELS order, whatever the model's label order."""
    return values[:, [model.config.labels.index(g) for g in LABELS]]


def fresh_late(seed=5, **kwargs):
    return tiny_model(labels=LABELS, fusion="late", seed=seed, **kwargs)


def test_one_bundle_is_reproduced_exactly_when_the_other_modality_is_missing(bundles):
    text = GenreClassifier.from_pretrained(bundles["text"])
    fused = fresh_late()
    report = init_from_bundles(fused, text_bundle=str(bundles["text"]))
    assert report == {"text": {"bundle": str(bundles["text"]), "tower": True, "head": True}}
    expected = logits(text, PLOTS)
    assert not torch.allclose(logits(fresh_late(), PLOTS, [None] * 4), expected, atol=1e-2)  # not by chance
    torch.testing.assert_close(logits(fused, PLOTS, [None] * 4), expected, atol=1e-5, rtol=1e-5)


def test_two_bundles_each_reproduced_up_to_the_shared_bias(bundles):
    text = GenreClassifier.from_pretrained(bundles["text"])
    image = GenreClassifier.from_pretrained(bundles["image"])
    fused = fresh_late()
    report = init_from_bundles(fused, text_bundle=str(bundles["text"]), image_bundle=str(bundles["image"]))
    assert report["text"]["head"] and report["image"]["head"]
    # The late head has one bias for both branches: it holds the mean of the two bundles' biases.
    bias_text = by_name(text, text.fusion.classifier[-1].bias[None])[0].detach()
    bias_image = by_name(image, image.fusion.classifier[-1].bias[None])[0].detach()
    assert (bias_text - bias_image).abs().max() > 0.1
    half = (bias_image - bias_text) / 2
    plot_only = logits(fused, PLOTS, [None] * 4)
    poster_only = logits(fused, [None] * 4, posters())
    torch.testing.assert_close(plot_only, logits(text, PLOTS) + half, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(poster_only, by_name(image, logits(image, None, posters())) - half, atol=1e-5, rtol=1e-5)
    # With both, each branch adds what it adds alone (the late head is a sum of branches).
    both = logits(fused, PLOTS, posters())
    bias = fused.fusion.classifier[-1].bias
    torch.testing.assert_close(both, plot_only + poster_only - bias, atol=1e-5, rtol=1e-5)


def test_towers_and_tokenizer_come_from_the_bundles(bundles):
    text = GenreClassifier.from_pretrained(bundles["text"])
    image = GenreClassifier.from_pretrained(bundles["image"])
    fused = fresh_late()
    assert not torch.equal(fused.text_tower.state_dict()["backbone.embeddings.word_embeddings.weight"],
                           text.text_tower.state_dict()["backbone.embeddings.word_embeddings.weight"])
    init_from_bundles(fused, text_bundle=str(bundles["text"]), image_bundle=str(bundles["image"]))
    for a, b in ((fused.text_tower, text.text_tower), (fused.image_tower, image.image_tower)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert fused.tokenizer.name_or_path == str(bundles["text"])  # the vocabulary its embeddings index
    assert fused.config.backbone_weights["text"] == f"MMGCS bundle {bundles['text']} (its trained text tower)"
    assert "MMGCS bundle" in fused.config.backbone_weights["image"]


def test_a_head_that_does_not_map_leaves_the_branch_fresh(bundles):
    text = GenreClassifier.from_pretrained(bundles["text_gated"])
    fused = fresh_late()
    before = {k: v.clone() for k, v in fused.fusion.state_dict().items()}
    report = init_from_bundles(fused, text_bundle=str(bundles["text_gated"]))
    assert report["text"] == {"bundle": str(bundles["text_gated"]), "tower": True, "head": False}
    assert all(torch.equal(before[k], v) for k, v in fused.fusion.state_dict().items())
    torch.testing.assert_close(fused.eval().encode_text(**_tokens(fused)), text.encode_text(**_tokens(text)))


def test_any_fusion_can_start_from_trained_towers(bundles):
    image = GenreClassifier.from_pretrained(bundles["image"])
    fused = tiny_model(labels=LABELS, fusion="attention", seed=5)
    assert init_from_bundles(fused, image_bundle=str(bundles["image"]))["image"]["head"] is False
    pixels = GenreProcessor.from_model(fused)(None, posters())["pixel_values"]
    torch.testing.assert_close(fused.eval().encode_image(pixels), image.encode_image(pixels))


def _tokens(model):
    batch = GenreProcessor.from_model(model)(PLOTS, None)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_other_genres_are_an_error_naming_them(bundles):
    fused = tiny_model(labels=("Action", "Comedy", "Drama", "Western"), fusion="late", seed=5)
    with pytest.raises(InitFromError, match=r"Only in this model: \['Western'\]; only in the bundle: \['Horror'\]"):
        init_from_bundles(fused, text_bundle=str(bundles["text"]))


def test_another_tower_is_an_error_naming_both_settings(bundles):
    fused = fresh_late(max_text_length=16)
    with pytest.raises(InitFromError, match="model.init_text_from=.*max_text_length: this model 16 vs the bundle 32"):
        init_from_bundles(fused, text_bundle=str(bundles["text"]))
    fused = fresh_late(image_size=32)
    with pytest.raises(InitFromError, match="image_size: this model 32 vs the bundle 64"):
        init_from_bundles(fused, image_bundle=str(bundles["image"]))


def test_a_bilstm_bundle_checks_its_own_settings(tmp_path):
    bundle = saved(tmp_path, "bilstm", labels=LABELS, image=False, fusion="late", text_tower="bilstm", seed=1)
    expected = logits(GenreClassifier.from_pretrained(bundle), PLOTS)
    fused = fresh_late(text_tower="bilstm", text_pooling="cls")  # a setting the BiLSTM does not read
    assert init_from_bundles(fused, text_bundle=str(bundle))["text"]["head"]
    torch.testing.assert_close(logits(fused, PLOTS, [None] * 4), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(InitFromError, match="lstm_hidden_dim: this model 8 vs the bundle 16"):
        init_from_bundles(fresh_late(text_tower="bilstm", lstm_hidden_dim=8), text_bundle=str(bundle))


def test_wrong_modality_and_missing_towers_are_errors(bundles, tmp_path):
    with pytest.raises(InitFromError, match="has no image tower.*give it as model.init_text_from instead"):
        init_from_bundles(fresh_late(), image_bundle=str(bundles["text"]))
    with pytest.raises(InitFromError, match="this model has no image tower"):
        init_from_bundles(tiny_model(labels=LABELS, image=False, fusion="late"), image_bundle=str(bundles["image"]))
    with pytest.raises(ValueError, match="is not a model folder"):
        init_from_bundles(fresh_late(), text_bundle=str(tmp_path / "missing"))
    with pytest.raises(InitFromError, match="model.init_text_from=someone/text-model: .*Hub is unreachable"):
        init_from_bundles(fresh_late(), text_bundle="someone/text-model")


def test_a_failed_check_changes_nothing(bundles):
    """The text bundle fits, the poster bundle does not: the text tower must stay as it was."""
    fused = fresh_late(image_size=32)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(InitFromError):
        init_from_bundles(fused, text_bundle=str(bundles["text"]), image_bundle=str(bundles["image"]))
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())


def test_config_fields_drive_it_and_survive_a_save(bundles, tmp_path):
    fused = fresh_late(init_text_from=str(bundles["text"]), init_image_from=str(bundles["image"]))
    assert set(init_from_config(fused)) == {"text", "image"}
    expected = logits(fused, PLOTS, posters())
    fused.save_pretrained(tmp_path / "fused")
    loaded = GenreClassifier.from_pretrained(tmp_path / "fused")  # a normal bundle: nothing re-initialised
    assert loaded.config.init_text_from == str(bundles["text"])
    torch.testing.assert_close(logits(loaded, PLOTS, posters()), expected)
    assert init_from_config(tiny_model(labels=LABELS)) == {}  # fields unset: nothing happens


def test_the_seeds_late_fusion_config_matches_the_seeds_runs_it_starts_from():
    from engine_helpers import REPO_ROOT

    from mmgcs.config import load_config

    seeds = REPO_ROOT / "configs" / "seeds"
    late = load_config([seeds / "late-fusion.yaml"])
    assert late.model.fusion == "late"
    for modality, source_file in (("text", "bilstm-text.yaml"), ("image", "resnet50-poster.yaml")):
        source = load_config([seeds / source_file])
        assert getattr(late.model, f"init_{modality}_from") == f"{source.train.output_dir}/model"
        for name in TOWER_FIELDS[modality] + TOWER_TYPE_FIELDS[getattr(source.model, f"{modality}_tower")]:
            if name != "text_backbone_config":  # resolved when the model is built
                assert getattr(late.model, name) == getattr(source.model, name), name
        if modality == "text":  # what the BiLSTM's vocabulary is built from
            assert (late.model.text_backbone, late.model.glove_path) == (source.model.text_backbone, source.model.glove_path)


def test_a_training_run_starts_from_the_bundles(tmp_path):
    from engine_helpers import GENRES, REPO_ROOT, TINY_TOWERS, build_dataset, small_run_overrides

    from mmgcs.config import load_config
    from mmgcs.engine import run

    data = build_dataset(tmp_path, n=30)
    text = tiny_model(labels=GENRES[::-1], image=False, fusion="late", seed=7, text_pooling="mean4",
                      text_template="{title}. {plot}")
    text.save_pretrained(tmp_path / "text")
    settings = {**TINY_TOWERS, "model.text_backbone": tiny_text_backbone_dir(), "model.fusion": "late",
                "model.init_text_from": tmp_path / "text", "train.epochs": 1, "train.text_finetune": "frozen"}
    run(load_config([REPO_ROOT / "configs" / "fusion.yaml"], small_run_overrides(settings, data, tmp_path / "fused")))
    fused = GenreClassifier.from_pretrained(tmp_path / "fused" / "model")
    a, b = fused.text_tower.state_dict(), text.text_tower.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)  # frozen, so still the bundle's
    assert fused.config.backbone_weights["text"].startswith("MMGCS bundle")


def test_a_run_refuses_a_whole_bundle_and_tower_bundles_together(tmp_path):
    from engine_helpers import GENRES, REPO_ROOT, TINY_TOWERS, build_dataset, small_run_overrides

    from mmgcs.config import load_config
    from mmgcs.engine import TrainingError, run

    data = build_dataset(tmp_path, n=30)
    tiny_model(labels=GENRES, image=False, fusion="late", seed=7).save_pretrained(tmp_path / "text")
    settings = {**TINY_TOWERS, "model.init_text_from": tmp_path / "text", "train.init_from": tmp_path / "text"}
    with pytest.raises(TrainingError, match="unset either it or model.init_text_from"):
        run(load_config([REPO_ROOT / "configs" / "fusion.yaml"], small_run_overrides(settings, data, tmp_path / "run")))
