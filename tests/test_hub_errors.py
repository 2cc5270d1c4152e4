"""mmgcs/hub/errors.py: the bundle's and the Hub's errors, and `is_out_of_memory`, which tells a failed allocation
(however a library words it, however deep in the chain of causes) from a damaged file or a wrong config. Loading a
bundle under a real memory limit: tests/test_hub_memory.py."""

from __future__ import annotations

import errno

import pytest

from mmgcs.hub.errors import BundleError, BundleMemoryError, HubUnavailableError, PushError, is_out_of_memory


def test_a_memory_error_is_a_bundle_error_and_a_memory_error():
    assert issubclass(BundleMemoryError, BundleError) and issubclass(BundleMemoryError, MemoryError)
    assert issubclass(BundleError, ValueError)  # callers that catch a bad value still catch a bad bundle
    assert issubclass(HubUnavailableError, RuntimeError) and issubclass(PushError, RuntimeError)
    assert not issubclass(PushError, BundleError)


@pytest.mark.parametrize("error", [
    MemoryError(),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 4294967296 bytes"),
    OSError("Error while deserializing header: Cannot allocate memory (os error 12)"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ValueError("Not enough memory to load the tokenizer"),
])
def test_failed_allocations_are_memory_however_they_are_worded(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", [
    ValueError("config.json describes a model that cannot be built"),
    OSError(errno.ENOENT, "No such file or directory"),
    RuntimeError("model.safetensors is corrupt or truncated"),
    BundleError("tokenizer.json is missing"),
])
def test_other_failures_are_not_memory(error):
    assert not is_out_of_memory(error)


def chain(depth: int, last: BaseException) -> BaseException:
    """`last` raised `depth` errors deep: each wrapper raised from the one below it."""
    error = last
    for i in range(depth):
        wrapper = RuntimeError(f"step {i} failed")
        wrapper.__cause__ = error
        error = wrapper
    return error


def test_a_failed_allocation_a_few_causes_deep_is_still_memory():
    assert is_out_of_memory(chain(3, MemoryError()))
    implicit = RuntimeError("while building the towers")
    implicit.__context__ = OSError(errno.ENOMEM, "Cannot allocate memory")  # raised inside an except block
    assert is_out_of_memory(implicit)
    assert not is_out_of_memory(chain(3, ValueError("a wrong value")))


def test_the_chain_is_followed_a_bounded_number_of_steps():
    assert is_out_of_memory(chain(7, MemoryError()))
    assert not is_out_of_memory(chain(8, MemoryError()))  # past the bound: a cycle or a very long chain ends
    loop = RuntimeError("a")
    loop.__cause__ = RuntimeError("b")
    loop.__cause__.__cause__ = loop  # a cycle of causes ends too
    assert not is_out_of_memory(loop)
