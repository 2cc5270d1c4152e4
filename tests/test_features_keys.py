"""mmgcs/features/keys.py on its own: the key's digest and the cache file's name, the column digest's rules (the
one column, in row order, None apart from empty, poster paths by size and time), and the errors before any work.
The keys of real towers, pinned across versions, are in test_features_store.py."""

import os
from types import SimpleNamespace

import pytest
from datasets import Dataset

from mmgcs.features import keys as K

KEY = {"format": 1, "modality": "text", "backbone": {"name": "sentence-transformers/all-MiniLM-L6-v2", "rev": None}}


def test_key_digest_is_independent_of_dict_order_and_changes_with_any_value():
    reordered = {"backbone": {"rev": None, "name": KEY["backbone"]["name"]}, "modality": "text", "format": 1}
    assert K.key_digest(reordered) == K.key_digest(KEY) and len(K.key_digest(KEY)) == 32
    assert K.key_digest({**KEY, "format": 2}) != K.key_digest(KEY)


@pytest.mark.parametrize("name, slug", [("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
                                        ("/models/local copy/", "local_copy"), ("a" * 60, "a" * 40), ("/", "_")])
def test_file_name_is_readable_and_unique(name, slug):
    key = {**KEY, "backbone": {"name": name}}
    assert K.file_name(key) == f"text-{slug}-{K.key_digest(key)}.safetensors"


def test_column_digest_counts_one_column_in_order_with_none_apart_from_empty():
    split = Dataset.from_dict({"id": [1, 2, 3], "plot": ["a", None, "c"], "title": ["x", "y", "z"]})
    digest = K.column_digest(split, "plot")
    assert digest == K.column_digest(split.map(lambda r: {"title": r["title"] * 2}), "plot")  # other columns: no
    assert digest != K.column_digest(split.select([2, 1, 0]), "plot")
    assert digest != K.column_digest(Dataset.from_dict({"plot": ["a", "", "c"]}), "plot")
    assert K.column_digest(split, "id") != K.column_digest(Dataset.from_dict({"id": [1, 2, 4]}), "id")


def test_a_poster_stored_as_a_path_counts_by_its_file(tmp_path):
    poster = tmp_path / "p.jpg"
    poster.write_bytes(b"first")
    split = Dataset.from_dict({"poster": [{"bytes": None, "path": str(poster)}]})
    before = K.column_digest(split, "poster")
    assert K.column_digest(split, "poster") == before
    poster.write_bytes(b"second, longer")
    os.utime(poster, ns=(1, 1))
    assert K.column_digest(split, "poster") != before  # same path, another file


def test_errors_before_any_work():
    with pytest.raises(ValueError, match=r"Unknown modality 'audio'; available: \['text', 'image'\]"):
        K.model_tower(SimpleNamespace(), "audio")
    with pytest.raises(ValueError, match="no image tower"):
        K.model_tower(SimpleNamespace(image_tower=None), "image")
    with pytest.raises(TypeError, match=r"one split, e.g. ds\['train'\]"):
        K.check_split({"train": []})
    model = SimpleNamespace(text_tower=object())
    with pytest.raises(ValueError, match="no 'plot' column"):
        K.feature_key(model, Dataset.from_dict({"id": [1]}), "text")
