"""mmgcs/hub/card.py: the model card a bundle is saved with: the Hub's metadata (library, pipeline tag by the
towers, tags), the model-index and per-genre table of the metrics given, and a re-save that refreshes it."""

import yaml

from mmgcs.hub.card import render_model_card
from mmgcs.testing import tiny_model
from test_hub_bundle import LABELS, saved  # noqa: F401  (saved: the module's saved tiny bundle, a fixture)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_metadata_and_metrics(saved):
    model, folder = saved
    meta = front_matter((folder / "README.md").read_text())
    assert meta["library_name"] == "mmgcs" and meta["pipeline_tag"] == "text-classification"
    assert "multimodal" in meta["tags"] and "model-index" not in meta
    metrics = {"micro_f1": 0.61234, "macro_f1": 0.4, "mAP": 0.5,
               "per_genre": {"Action": {"precision": 0.7, "recall": 0.6, "f1": 0.65, "support": 10, "threshold": 0.4}}}
    card = render_model_card(model.config, metrics, "someone/tmdb-movies")
    meta = front_matter(card)
    assert meta["datasets"] == ["someone/tmdb-movies"]
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"]["type"] == "someone/tmdb-movies" and result["dataset"]["name"]
    values = {(m["type"], m.get("config")): m["value"] for m in result["metrics"]}
    assert values[("f1", "micro")] == 0.6123 and values[("mean_average_precision", "macro")] == 0.5
    assert "| Action | 0.700 | 0.600 | 0.650 | 10 |" in card
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.library_name == "mmgcs"
    poster_only = render_model_card(tiny_model(LABELS, text=False).config)
    assert front_matter(poster_only)["pipeline_tag"] == "image-classification"


def test_save_with_metrics_writes_them_into_the_card(tmp_path):
    model = tiny_model(LABELS)
    model.save_pretrained(tmp_path, model_card_kwargs={"metrics": {"micro_f1": 0.5}, "dataset_id": "me/movies"})
    meta = front_matter((tmp_path / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    model.save_pretrained(tmp_path)  # a re-save refreshes the card instead of keeping the stale one
    assert "model-index" not in front_matter((tmp_path / "README.md").read_text())
