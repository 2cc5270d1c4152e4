"""Out of memory while loading, reported as memory (issue 18): under `prlimit --as` the load said "model.safetensors
is corrupt or truncated (... Cannot allocate memory (12))" or "config.json describes a model that cannot be built",
sending users to re-download or re-train. Now: a BundleMemoryError (a BundleError and a MemoryError) saying the
machine ran out of memory, how much the bundle needs, and the remedy."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError

from mmgcs import GenreClassifier
from mmgcs.hub import BundleError
from mmgcs.hub import bundle as bundle_module
from mmgcs.hub import weights as weights_module
from mmgcs.hub.errors import BundleMemoryError, is_out_of_memory
from mmgcs.hub.memory import _gigabytes
from mmgcs.models import classifier
from mmgcs.testing import tiny_model

LABELS = ["Action", "Comedy", "Drama"]
TORCH_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
             "allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    tiny_model(LABELS, fusion="gated").save_pretrained(folder)
    return folder


def assert_said_as_memory(error: BaseException, bundle) -> None:
    text = str(error)
    header = weights_module.read_header(bundle / "model.safetensors")
    need, weight_bytes = weights_module.need_bytes(header), sum(entry.nbytes for entry in header.values())
    assert isinstance(error, BundleMemoryError) and isinstance(error, MemoryError) and isinstance(error, BundleError)
    assert text.startswith(f"Out of memory while loading the model in {bundle}: it needs about {_gigabytes(need)} ")
    assert f"({_gigabytes(weight_bytes)} of weights in model.safetensors, plus its largest tensor" in text
    assert "The bundle is not damaged" in text
    assert "on a machine with more" in text and "use a smaller model" in text
    assert "corrupt" not in text and "cannot be built" not in text and "re-download" not in text


@pytest.mark.parametrize("raised", [MemoryError(), RuntimeError(TORCH_OOM), torch.OutOfMemoryError("CUDA out of memory")])
def test_running_out_while_building_is_memory_not_a_bad_config(bundle, monkeypatch, raised):
    real = classifier.create_fusion

    def fusion_out_of_memory(*args, **kwargs):
        if torch.empty(0).device.type == "meta":  # the checks' build on the meta device allocates nothing
            return real(*args, **kwargs)
        raise raised

    monkeypatch.setattr(classifier, "create_fusion", fusion_out_of_memory)
    with pytest.raises(BundleMemoryError) as err:
        GenreClassifier.from_pretrained(bundle)
    assert_said_as_memory(err.value, bundle)


@pytest.mark.parametrize("raised", [
    SafetensorError("Error while deserializing header: I/O error: Cannot allocate memory (os error 12)"),
    OSError(12, "Cannot allocate memory"),
    MemoryError(),
])
def test_running_out_while_reading_the_weights_is_memory_not_corruption(bundle, monkeypatch, raised):
    def open_out_of_memory(*args, **kwargs):
        raise raised

    monkeypatch.setattr(weights_module, "safe_open", open_out_of_memory)
    with pytest.raises(BundleMemoryError) as err:
        GenreClassifier.from_pretrained(bundle)
    assert_said_as_memory(err.value, bundle)


def test_running_out_while_loading_the_tokenizer_is_memory(bundle, monkeypatch):
    def tokenizer_out_of_memory(*args, **kwargs):
        raise OSError("Can't load tokenizer") from MemoryError()

    monkeypatch.setattr(bundle_module, "load_tokenizer", tokenizer_out_of_memory)
    with pytest.raises(BundleMemoryError) as err:
        GenreClassifier.from_pretrained(bundle)
    assert_said_as_memory(err.value, bundle)


def test_other_failures_keep_their_own_message(bundle, monkeypatch):
    def broken(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: invalid offsets")

    monkeypatch.setattr(weights_module, "safe_open", broken)
    with pytest.raises(BundleError, match="corrupt or truncated .*invalid offsets") as err:
        GenreClassifier.from_pretrained(bundle)
    assert not isinstance(err.value, MemoryError)
    assert not is_out_of_memory(ValueError("config.json describes a model that cannot be built"))


CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from mmgcs import GenreClassifier
    from mmgcs.hub import BundleError

    small, large = Path(sys.argv[1]), Path(sys.argv[2])
    GenreClassifier.from_pretrained(small)  # every import and first-use cost paid before the limit
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 24 * 2**20, resource.RLIM_INFINITY))  # prlimit --as
    try:
        GenreClassifier.from_pretrained(large)
        print("LOADED")
    except BundleError as e:
        print(type(e).__name__, e)
""")


def test_a_real_address_space_limit_is_reported_as_memory(bundle, tmp_path):
    """The issue's reproduction in small: a process limited (as by `prlimit --as`) to 24 MB more than it uses
    loads a bundle of 48 MB of weights."""
    large = tmp_path / "large"
    tiny_model(LABELS, image=False, lexical=True, lexical_features=2**22).save_pretrained(large)  # 4M x 3 floats
    weight_bytes = (large / "model.safetensors").stat().st_size
    assert weight_bytes > 40 * 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(large)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"BundleMemoryError Out of memory while loading the model in {large}"), done.stdout
    assert "this process may use at most" in done.stdout and "corrupt" not in done.stdout
