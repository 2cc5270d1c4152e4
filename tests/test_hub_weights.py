"""model.safetensors' header compared with the model before any tensor is read (issue 18): a sparse 4 GiB extra
tensor took a load to 13 GB for 37 s before the strict check refused it. Now an extra, mis-shaped or mis-typed
tensor is refused from the header alone, without mapping or reading the data."""

import resource

import pytest
import torch
from bundle_helpers import read_raw_header, retyped_weights, write_safetensors
from safetensors.torch import load_file, save_file

from mmgcs import GenreClassifier
from mmgcs.hub import BundleError
from mmgcs.hub import weights as weights_module
from mmgcs.hub.weights import read_header
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
GIB = 2**30


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    tiny_model(LABELS, fusion="gated").save_pretrained(folder)
    return folder


@pytest.fixture
def no_tensor_read(monkeypatch):
    """Any read of the tensors' data fails the test: the refusal must come from the header alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the header was checked")

    monkeypatch.setattr(weights_module, "safe_open", refuse)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def test_a_sparse_4gib_extra_tensor_is_refused_before_any_read(bundle, tmp_path, no_tensor_read):
    bad = retyped_weights(bundle, "extra", tmp_path, {"fusion.rogue": ("F32", [GIB])})
    assert (bad / "model.safetensors").stat().st_size > 4 * GIB  # the header is honest about the file's size
    before = peak_rss_bytes()
    with pytest.raises(BundleError, match=r"model\.safetensors does not match the model described by its config\.json "
                                          r"\(unexpected tensors: fusion\.rogue\)"):
        GenreClassifier.from_pretrained(bad)
    assert peak_rss_bytes() - before < 256 * 2**20  # reading it would have added 4 GiB


def test_a_huge_mis_shaped_tensor_is_refused_before_any_read(bundle, tmp_path, no_tensor_read):
    victim = sorted(k for k in load_file(bundle / "model.safetensors") if k.startswith("fusion."))[0]
    bad = retyped_weights(bundle, "shaped", tmp_path, {victim: ("F32", [65536, 65536])})  # 16 GiB
    with pytest.raises(BundleError, match=rf"mis-shaped tensors: {victim}: file \(65536, 65536\) vs model \("):
        GenreClassifier.from_pretrained(bad)


@pytest.mark.parametrize("dtype", ["I32", "BOOL", "F8_E4M3"])
def test_a_float_weight_stored_as_another_kind_is_refused(bundle, tmp_path, no_tensor_read, dtype):
    state = load_file(bundle / "model.safetensors")
    victim = sorted(k for k in state if k.startswith("fusion.") and state[k].is_floating_point())[0]
    bad = retyped_weights(bundle, dtype, tmp_path, {victim: (dtype, list(state[victim].shape))})
    with pytest.raises(BundleError, match=rf"mis-typed tensors: {victim}: file {dtype} vs model float32"):
        GenreClassifier.from_pretrained(bad)


def test_half_precision_weights_still_load_cast_to_the_model(bundle, tmp_path):
    state = load_file(bundle / "model.safetensors")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    folder = tmp_path / "half"
    folder.mkdir()
    for p in bundle.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    save_file(half, folder / "model.safetensors")
    loaded = GenreClassifier.from_pretrained(folder)
    name = next(k for k, v in state.items() if v.is_floating_point())
    assert loaded.state_dict()[name].dtype == torch.float32
    assert torch.equal(loaded.state_dict()[name], half[name].float())


@pytest.mark.parametrize("damage,reason", [
    (lambda blob: b"\xff" * 8 + blob[8:], r"its header length [\d,]+ does not fit a file of"),
    (lambda blob: blob[:8] + b"[" * 20 + blob[28:], r"its header is not JSON"),
    (lambda blob: blob[:40], r"its header length [\d,]+ does not fit a file of 40 bytes"),
])
def test_a_damaged_header_is_corrupt_not_a_crash(bundle, tmp_path, damage, reason):
    bad = retyped_weights(bundle, "damaged", tmp_path, {})
    file = bad / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(BundleError, match=rf"model\.safetensors is corrupt or truncated \({reason}.*re-save or re-download"):
        GenreClassifier.from_pretrained(bad)


def test_data_that_ends_past_the_file_is_truncated_before_any_read(bundle, tmp_path, no_tensor_read):
    header, data = read_raw_header(bundle / "model.safetensors")
    bad = retyped_weights(bundle, "short", tmp_path, {})
    write_safetensors(bad / "model.safetensors", header, data[: len(data) // 2], len(data) // 2)
    with pytest.raises(BundleError, match=r"corrupt or truncated \(its tensors end at byte [\d,]+ of a [\d,]+-byte file\)"):
        GenreClassifier.from_pretrained(bad)


def test_a_deeply_nested_header_is_refused_without_recursion(bundle, tmp_path):
    bad = retyped_weights(bundle, "deep", tmp_path, {})
    header, data = read_raw_header(bad / "model.safetensors")
    file = bad / "model.safetensors"
    raw = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    with pytest.raises(BundleError, match=r"corrupt or truncated \(its header nests too deep\)"):
        GenreClassifier.from_pretrained(bad)


def test_the_header_reader_gives_every_tensor(bundle):
    header = read_header(bundle / "model.safetensors")
    state = load_file(bundle / "model.safetensors")
    assert header.keys() == state.keys()
    for name, tensor in state.items():
        assert header[name].shape == tuple(tensor.shape)
        assert header[name].nbytes == tensor.numel() * tensor.element_size()
