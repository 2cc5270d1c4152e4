"""Every registered text tower × image tower × fusion head, built tiny: shapes, loss, gradients, masks."""

import itertools

import pytest
import torch

from mmgcs.models import FUSIONS, IMAGE_TOWERS, TEXT_TOWERS
from mmgcs.testing import tiny_model
from mmgcs.processor import GenreProcessor

LABELS = ["Action", "Comedy", "Drama", "Horror"]
PLOTS = ["A young soldier must save his family from the war.", "Two friends start a band in London and fall in love."]

COMBOS = [
    (t, i, f)
    for t, i, f in itertools.product(TEXT_TOWERS.names() + ["none"], IMAGE_TOWERS.names() + ["none"], FUSIONS.names())
    if not (t == "none" and i == "none")
]


def build(text_tower, image_tower, fusion, **kw):
    return tiny_model(
        LABELS, text=text_tower != "none", image=image_tower != "none", fusion=fusion,
        **({"text_tower": text_tower} if text_tower != "none" else {}),
        **({"image_tower": image_tower} if image_tower != "none" else {}),
        **kw,
    )


def batch_for(model, n=2, with_labels=True):
    posters = [torch.rand(3, 80, 60).mul(255).byte().permute(1, 2, 0).numpy() for _ in range(n)]
    batch = GenreProcessor.from_model(model)((PLOTS * n)[:n], posters)
    if with_labels:
        batch["labels"] = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]] * n)[:n]
    return batch


def test_registries_cover_the_issue():
    assert {"hf", "bilstm"} <= set(TEXT_TOWERS.names())
    assert {"timm", "simplecnn"} <= set(IMAGE_TOWERS.names())
    assert {"late", "concat", "gated", "attention"} <= set(FUSIONS.names())


@pytest.mark.parametrize("text_tower,image_tower,fusion", COMBOS)
def test_forward_loss_gradients_and_missing_modality(text_tower, image_tower, fusion):
    model = build(text_tower, image_tower, fusion)
    model.train()
    batch = batch_for(model)
    assert ("input_ids" in batch) == (text_tower != "none")
    assert ("pixel_values" in batch) == (image_tower != "none")

    out = model(**batch)
    assert out["logits"].shape == (2, len(LABELS))
    assert out["loss"] is not None and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"

    model.eval()
    with torch.no_grad():
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**no_labels)["loss"] is None
        # batch of one gives the same logits as the same row inside a batch of two
        single = {k: v[:1] for k, v in no_labels.items()}
        if "attention_mask" in single:  # trim the padding the longer plot added
            length = int(single["attention_mask"].sum())
            single["input_ids"] = single["input_ids"][:, :length]
            single["attention_mask"] = single["attention_mask"][:, :length]
        torch.testing.assert_close(model(**single)["logits"], model(**no_labels)["logits"][:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_missing_modality_rows_ignore_the_missing_input(fusion):
    model = build("hf", "timm", fusion).eval()
    batch = batch_for(model, with_labels=False)
    batch["image_mask"] = torch.tensor([False, True])
    batch["text_mask"] = torch.tensor([True, False])
    with torch.no_grad():
        before = model(**batch)["logits"]
        # change what the missing inputs hold: the masked rows' logits must not move
        changed = dict(batch, pixel_values=batch["pixel_values"].clone(), input_ids=batch["input_ids"].clone())
        changed["pixel_values"][0] = torch.randn_like(changed["pixel_values"][0]) * 3
        changed["input_ids"][1, 1:3] = 7
        after = model(**changed)["logits"]
    assert torch.isfinite(before).all()
    torch.testing.assert_close(before, after)
    # and a present modality does matter
    with torch.no_grad():
        changed["image_mask"] = torch.tensor([True, True])
        assert not torch.allclose(model(**changed)["logits"][0], before[0])


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_row_with_no_modality_gives_finite_logits(fusion):
    model = build("hf", "timm", fusion).eval()
    batch = batch_for(model, with_labels=False)
    batch["text_mask"] = torch.tensor([False, True])
    batch["image_mask"] = torch.tensor([False, True])
    with torch.no_grad():
        assert torch.isfinite(model(**batch)["logits"]).all()


def test_image_only_batch_on_a_fused_model_masks_the_text():
    model = build("hf", "timm", "gated").eval()
    batch = batch_for(model, with_labels=False)
    with torch.no_grad():
        image_only = model(pixel_values=batch["pixel_values"])["logits"]
        masked = model(**dict(batch, text_mask=torch.tensor([False, False])))["logits"]
    torch.testing.assert_close(image_only, masked)


def test_cached_features_give_the_same_logits_as_raw_inputs():
    model = build("hf", "timm", "attention").eval()
    batch = batch_for(model, with_labels=False)
    with torch.no_grad():
        raw = model(**batch)["logits"]
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        image = model.encode_image(batch["pixel_values"])
        cached = model(text_features=text, image_features=image, text_mask=batch["text_mask"], image_mask=batch["image_mask"])
    assert text.shape == (2, model.text_tower.out_dim) and image.shape == (2, model.image_tower.out_dim)
    torch.testing.assert_close(raw, cached["logits"])


def test_modality_dropout_hides_one_modality_only_in_training():
    model = build("hf", "timm", "concat", modality_dropout=0.99)
    masks = [torch.ones(1000, dtype=torch.bool), torch.ones(1000, dtype=torch.bool)]
    text, image = model._drop_modality(masks)
    assert (text | image).all(), "a row must keep at least one modality"
    assert 0.35 < (~text).float().mean() < 0.65 and 0.35 < (~image).float().mean() < 0.65
    batch = batch_for(model, with_labels=False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["logits"], model(**batch)["logits"])


def test_pos_weight_changes_the_loss():
    plain = build("hf", "none", "concat")
    weighted = build("hf", "none", "concat", pos_weight=[5.0, 1.0, 1.0, 1.0])
    batch = batch_for(plain)
    plain.eval(), weighted.eval()
    with torch.no_grad():
        assert weighted(**batch)["loss"] > plain(**batch)["loss"]


def test_singlelabel_task_uses_softmax_cross_entropy():
    model = tiny_model(["poster", "not_poster"], text=False, fusion="concat", task="singlelabel").eval()
    batch = batch_for(model, with_labels=False)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(**batch, labels=labels)
        expected = torch.nn.functional.cross_entropy(out["logits"], labels)
    torch.testing.assert_close(out["loss"], expected)
    probs = model.probabilities(out["logits"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_wrong_label_shape_is_a_clear_error():
    model = build("hf", "none", "gated")
    batch = batch_for(model, with_labels=False)
    with pytest.raises(ValueError, match="multi-hot"):
        model(**batch, labels=torch.zeros(2, 3))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"Unknown fusion 'sum'; available: \['attention', 'concat', 'gated', 'late'\]"):
        tiny_model(LABELS, fusion="sum")
    with pytest.raises(ValueError, match="Unknown text tower 'gru'; available"):
        tiny_model(LABELS, text_tower="gru")
    with pytest.raises(ValueError, match="Unknown image tower 'vgg'; available"):
        tiny_model(LABELS, image_tower="vgg")
    with pytest.raises(ValueError, match="both 'none'"):
        tiny_model(LABELS, text=False, image=False)
    with pytest.raises(TypeError, match="Unknown config key 'fusoin'"):
        tiny_model(LABELS, fusoin="late")


@pytest.mark.parametrize("tower", ["text", "image"])
def test_set_finetune_modes(tower):
    model = tiny_model(LABELS, fusion="late")
    t = model.text_tower if tower == "text" else model.image_tower
    total = sum(1 for _ in t.parameters())
    t.set_finetune("frozen")
    assert not any(p.requires_grad for p in t.parameters())
    model.train()
    assert not t.training, "a frozen tower stays in eval mode (no dropout, no BatchNorm drift)"
    t.set_finetune("partial", 1)
    partial = sum(p.requires_grad for p in t.parameters())
    assert 0 < partial < total
    t.set_finetune("partial", 2)
    assert sum(p.requires_grad for p in t.parameters()) > partial
    last_group = t.finetune_groups()[-1]
    assert all(p.requires_grad for p in last_group.parameters())
    t.set_finetune("full")
    assert all(p.requires_grad for p in t.parameters())
    with pytest.raises(ValueError, match="available"):
        t.set_finetune("half")


def test_frozen_batchnorm_keeps_running_stats():
    model = tiny_model(LABELS, text=False, fusion="concat")
    model.image_tower.set_finetune("frozen")
    model.train()
    before = {k: v.clone() for k, v in model.image_tower.state_dict().items() if "running_mean" in k}
    batch = batch_for(model)
    model(**batch)["loss"].backward()
    after = {k: v for k, v in model.image_tower.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bilstm_with_glove_file(tmp_path):
    words = ["the", "soldier", "war", "love", "band", ",", "."]
    dim = 16
    lines = [w + " " + " ".join(f"{(i + 1) * 0.01 + j * 0.001:.4f}" for j in range(dim)) for i, w in enumerate(words)]
    glove = tmp_path / "glove.6B.16d.txt"
    glove.write_text("\n".join(lines) + "\n")
    model = tiny_model(LABELS, text_tower="bilstm", glove_path=str(glove), word_embedding_dim=dim, image=False, fusion="concat")
    tok = model.tokenizer
    assert model.config.vocab_size == len(words) + 2 == len(tok)
    ids = tok(["The SOLDIER, unknownword"])["input_ids"][0]
    assert ids == [tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("soldier"), tok.convert_tokens_to_ids(","), tok.unk_token_id]
    emb = model.text_tower.embedding.weight
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("war")][0], torch.tensor(0.03))
    assert not emb.requires_grad, "GloVe vectors are frozen by default"
    model.text_tower.set_finetune("full")
    assert not emb.requires_grad
    trainable = tiny_model(LABELS, text_tower="bilstm", glove_path=str(glove), word_embedding_dim=dim, image=False,
                           freeze_word_embeddings=False)
    assert trainable.text_tower.embedding.weight.requires_grad

    # the word tokenizer and the vectors travel in the bundle: no GloVe file needed to load
    from mmgcs import GenreClassifier

    model.save_pretrained(tmp_path / "bundle")
    glove.unlink()
    loaded = GenreClassifier.from_pretrained(tmp_path / "bundle")
    assert loaded.tokenizer(["The SOLDIER, unknownword"])["input_ids"][0] == ids
    batch = GenreProcessor.from_model(model)(PLOTS, None)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["logits"], model(**batch)["logits"], rtol=0, atol=0)

    bad = tmp_path / "bad.txt"
    bad.write_text("the 0.1 0.2\n")
    with pytest.raises(ValueError, match="word_embedding_dim"):
        tiny_model(LABELS, text_tower="bilstm", glove_path=str(bad), word_embedding_dim=dim, image=False)


def test_inference_skips_a_tower_whose_input_is_missing_everywhere_but_training_runs_it():
    model = build("hf", "timm", "gated")
    calls = []
    model.image_tower.register_forward_hook(lambda *a: calls.append(1))
    batch = GenreProcessor.from_model(model)(PLOTS, [None, None])
    model.eval()
    with torch.no_grad():
        skipped = model(**batch)["logits"]
        ran = model(**dict(batch, image_mask=torch.tensor([False, True])))["logits"]
    assert len(calls) == 1
    torch.testing.assert_close(skipped[0], ran[0])  # row 0 has no poster either way
    model.train()
    model(**batch)
    assert len(calls) == 2, "in training every tower runs (DDP needs every parameter in the graph)"
