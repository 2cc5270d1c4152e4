"""The hf text tower's poolings: mean4 is the average of the masked means of the last min(4, n_layers) layers."""

import pytest
import torch

from mmgcs import GenreClassifier
from mmgcs.models.preprocessing import tokenize
from mmgcs.testing import tiny_model
from mmgcs.processor import GenreProcessor

LABELS = ["Action", "Comedy", "Drama"]
# Different lengths, so padding is present and the mask matters.
PLOTS = ["A soldier must save his family.", "Two friends start a band in London, fall in love and then split up."]


def _encode(model):
    return tokenize(model.tokenizer, model.config, PLOTS)


def _hand_mean(hidden, mask):
    rows = []
    for h, m in zip(hidden, mask):
        rows.append(h[m.bool()].mean(0))
    return torch.stack(rows)


def test_mean4_averages_the_masked_means_of_the_last_layers():
    model = tiny_model(LABELS, image=False, text_pooling="mean4").eval()
    tower = model.text_tower
    enc = _encode(model)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        out = tower(**enc)
        states = tower.backbone(**enc, output_hidden_states=True).hidden_states
    n_layers = tower.backbone.config.num_hidden_layers
    assert len(states) == n_layers + 1  # the embeddings, then each layer
    last = states[1:][-min(4, n_layers):]
    expected = torch.stack([_hand_mean(h, enc["attention_mask"]) for h in last]).mean(0)
    assert out.shape == (len(PLOTS), tower.out_dim)
    torch.testing.assert_close(out, expected)

    # and it is not last-layer mean pooling under another name
    mean_tower = tiny_model(LABELS, image=False, text_pooling="mean").eval().text_tower
    mean_tower.load_state_dict(tower.state_dict())
    with torch.no_grad():
        mean_out = mean_tower(**enc)
    torch.testing.assert_close(mean_out, _hand_mean(states[-1], enc["attention_mask"]))
    assert not torch.allclose(mean_out, out)


def test_mean4_bundle_round_trips(tmp_path):
    model = tiny_model(LABELS, text_pooling="mean4").eval()
    model.save_pretrained(tmp_path / "bundle")
    loaded = GenreClassifier.from_pretrained(tmp_path / "bundle").eval()
    assert loaded.config.text_pooling == "mean4"
    assert loaded.text_tower.pooling == "mean4"
    batch = GenreProcessor.from_model(model)(PLOTS, None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], model(**batch)["logits"], rtol=0, atol=0)


def test_unknown_pooling_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown text_pooling 'max4'.*'cls'.*'mean'.*'mean4'"):
        tiny_model(LABELS, image=False, text_pooling="max4")
