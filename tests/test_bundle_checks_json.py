"""The bundle's JSON files checked for size and nesting before any parser sees them (issue 18): a deeply nested
tokenizer.json made `from_pretrained` raise a raw RecursionError from inside transformers. Now a BundleError names
the file, the problem and the remedy."""

import shutil

import pytest

from mmgcs import GenreClassifier
from mmgcs import bundle_checks as checks
from mmgcs.bundle_checks import MAX_JSON_DEPTH, json_too_deep
from mmgcs.hub import BundleError
from mmgcs.hub import bundle as bundle_module
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
DEEP = "[" * 100_000 + "]" * 100_000
REMEDY = r"re-download the bundle or re-save the model with model\.save_pretrained"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    tiny_model(LABELS).save_pretrained(folder)
    return folder


def copy_of(bundle, tmp_path):
    dest = tmp_path / "bad"
    shutil.copytree(bundle, dest)
    return dest


@pytest.mark.parametrize("name,text", [
    ("tokenizer.json", DEEP),
    ("tokenizer.json", '{"model": ' + "[" * 100_000),  # unclosed: Python's parser recurses before it sees the end
    ("tokenizer_config.json", '{"x": ' + "{\"a\": " * 100_000 + "1" + "}" * 100_001),
    ("config.json", DEEP),
    ("chat_template.json", DEEP),  # any JSON a library may read from the folder
])
def test_a_deeply_nested_json_file_is_a_bundle_error_naming_it(bundle, tmp_path, name, text):
    bad = copy_of(bundle, tmp_path)
    (bad / name).write_text(text)
    with pytest.raises(BundleError, match=rf"{name} cannot be read: {name} nests arrays or objects deeper than "
                                          rf"{MAX_JSON_DEPTH} levels.*{REMEDY}"):
        GenreClassifier.from_pretrained(bad)


def test_an_oversized_json_file_is_refused_before_it_is_parsed(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "MAX_JSON_BYTES", 4096)  # the tiny tokenizer.json is larger than this
    with pytest.raises(BundleError, match=rf"tokenizer\.json cannot be read: tokenizer\.json is [\d,]+ bytes, above the "
                                          rf"bound of 4,096 bytes for it.*{REMEDY}"):
        GenreClassifier.from_pretrained(bundle)


def test_a_recursion_error_from_the_tokenizer_library_is_still_a_bundle_error(bundle, monkeypatch):
    def deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    monkeypatch.setattr(bundle_module, "load_tokenizer", deep)
    with pytest.raises(BundleError, match=r"The tokenizer in .* cannot be loaded \(RecursionError: .*re-save the model"):
        GenreClassifier.from_pretrained(bundle)


def test_nesting_is_counted_outside_strings_only():
    assert not json_too_deep(b'{"a": "' + b"[" * 500 + b'", "b": "\\"' + b"{" * 500 + b'"}')
    assert not json_too_deep(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert json_too_deep(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert json_too_deep(b'{"a": [' + b"{" * 100 + b"]}")  # malformed and deep: still refused
    assert not json_too_deep(b"") and not json_too_deep(b"3.5") and not json_too_deep(b'"unterminated [[[[')


def test_real_bundle_json_files_pass(bundle):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert checks.json_file_problem(bundle / name) is None
    assert GenreClassifier.from_pretrained(bundle).labels == LABELS
