"""Tiny GenreClassifiers for tests: built in code, offline, in well under a second.

`tiny_model(labels)` goes through the same `create_model` path as a real model, with `pretrained=False`:
the text backbone is a tiny BERT (hidden 32, 2 layers) whose config and WordPiece tokenizer are written once
per process to a temporary folder (a "local folder" backbone); the image backbone is timm's
`test_efficientnet` at 64 px. Weights are random but reproducible (seeded).
"""

import atexit
import functools
import shutil
import string
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from mmgcs.models.classifier import GenreClassifier, create_model

TINY_IMAGE_BACKBONE = "test_efficientnet"
TINY_IMAGE_SIZE = 64

_WORDS = """the a an and or of to in on at by for with from as is are was were be been it its he she they them his her
their this that these those who whom which what when where why how not no but if then than so after before while
during about into over under between against through young old new man woman men women boy girl family father
mother son daughter brother sister friend friends wife husband love life death world city town war army soldier
police detective agent killer murder crime gang heist robbery drug money secret mission team hero villain
monster ghost vampire zombie alien planet space ship earth future past time school college student teacher
king queen prince princess kingdom magic dragon witch wizard island ocean sea forest mountain desert village
home house night day dark light story journey adventure quest escape fight battle save rescue find discover
must will can could would should has have had one two three first last group small big great evil good lives
falls meets becomes tries finds learns returns begins years life-changing comedy drama horror thriller romance
action animated musical documentary western mystery fantasy science fiction history dog cat car train road
music band singer dance game film movie star hollywood new york london paris""".split()


@functools.lru_cache(maxsize=None)
def tiny_text_backbone_dir(hidden_size: int = 32, num_layers: int = 2) -> str:
    """A folder holding a tiny random BERT and its WordPiece tokenizer (vocab: common plot words + letters)."""
    folder = Path(tempfile.mkdtemp(prefix="mmgcs-tiny-bert-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + sorted(set(_WORDS))
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def tiny_model(labels=("Action", "Comedy", "Drama"), text: bool = True, image: bool = True, fusion: str = "gated",
               seed: int = 0, **overrides) -> GenreClassifier:
    """A tiny GenreClassifier over `labels`; `text`/`image` choose the towers; `overrides` are ModelConfig
    fields (e.g. `task="singlelabel"`, `text_tower="bilstm"`, `image_tower="simplecnn"`). Deterministic for a
    given seed, and it leaves the global RNG untouched."""
    settings = dict(
        text_tower="hf" if text else "none",
        text_backbone=tiny_text_backbone_dir(),
        max_text_length=32,
        lstm_hidden_dim=16,
        word_embedding_dim=16,
        image_tower="timm" if image else "none",
        image_backbone=TINY_IMAGE_BACKBONE,
        image_size=TINY_IMAGE_SIZE,
        fusion=fusion,
        fusion_dim=32,
        dropout=0.1,
        pretrained=False,  # random towers (the seed makes them reproducible); no weights to fetch
    )
    settings.update(overrides)
    if not text:
        settings["text_tower"] = "none"
    if not image:
        settings["image_tower"] = "none"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(labels=list(labels), **settings)


__all__ = ["TINY_IMAGE_BACKBONE", "TINY_IMAGE_SIZE", "tiny_model", "tiny_text_backbone_dir"]
