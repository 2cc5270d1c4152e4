"""Helpers of the prefix tests (tests/test_features_prefix.py, test_features_image_prefix.py,
test_models_text_prefix.py, test_models_image_prefix.py): BERT-style and MPNet-style encoders built in code, padded batches, each row's text
prefix and each poster's feature maps as the caches compute them, the trainable parameters' gradients."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import datasets
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

from mmgcs.models.image_prefix import ImageBottom, image_cut
from mmgcs.testing import tiny_model, tiny_text_backbone_dir

ARCHS = ("bert", "mpnet")
LAYERS = 4
TOL = 1e-5


def tiny_config(arch: str, dropout: float = 0.0, vocab: int = 60, pad: int = 0):
    sizes = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                 intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=pad)
    if arch == "bert":
        return BertConfig(max_position_embeddings=64, **sizes)
    # MPNet: a relative position bias computed once in its encoder and passed to every layer
    return MPNetConfig(max_position_embeddings=80, relative_attention_num_buckets=32, **sizes)


def tiny_backbone(arch: str, dropout: float = 0.0):
    model_cls = BertModel if arch == "bert" else MPNetModel
    return model_cls(tiny_config(arch, dropout), add_pooling_layer=False)


@functools.lru_cache(maxsize=None)
def backbone_dir(arch: str) -> str:
    """A local folder backbone: the tiny test tokenizer with a 4-layer BERT or MPNet of its vocabulary."""
    if arch == "bert":
        return tiny_text_backbone_dir(num_layers=LAYERS)
    folder = tempfile.mkdtemp(prefix="mmgcs-tiny-mpnet-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_backbone_dir())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = tiny_config("mpnet", vocab=len(tokenizer), pad=tokenizer.pad_token_id)
        MPNetModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def padded_batch(lengths=(5, 9, 12), width: int = 16, pad: int = 0):
    """Rows of the given valid lengths, padded (right) past the longest: the prefix path pads to the longest only."""
    ids = torch.randint(5, 60, (len(lengths), width))
    attn = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    return ids.masked_fill(attn == 0, pad), attn


def prefix_rows(tower, ids, attn) -> list[dict]:
    """Each row's cached prefix, computed alone as the cache computes it (eval mode, no gradients, valid tokens)."""
    rows = []
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        for i in range(len(ids)):
            n = int(attn[i].sum())
            hidden, means = tower.encode_prefix(ids[i : i + 1, :n], attn[i : i + 1, :n])
            rows.append({"text_hidden": hidden[0], **({"text_frozen_means": means[0]} if means is not None else {})})
    tower.train(was_training)
    return rows


def trainable_grads(module, loss) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def tiny_split(n: int = 7):
    plots = ["the young agent must escape the city", None, "a ghost story", "love", "the family of a soldier and "
             "his friends who fight a long war in the mountains and return home", "   ", "a dog and a cat"][:n]
    return datasets.Dataset.from_dict({"id": list(range(100, 100 + n)), "plot": plots,
                                       "genres": [[i % 3] for i in range(n)]})


def text_model(arch: str, trainable: int = 1, **overrides):
    model = tiny_model(image=False, text_backbone=backbone_dir(arch), text_pooling="mean4", **overrides)
    model.text_tower.set_finetune("partial", trainable)
    return model.eval()  # no dropout: the two paths must give the same numbers


def cached_maps(tower, pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The feature maps the cache stores for `pixels`: the bottom run alone, in eval mode, without gradients."""
    bottom = ImageBottom(tower, image_cut(tower), size)
    with torch.no_grad():
        return bottom(pixels).reshape(-1, *bottom.map_shape)
