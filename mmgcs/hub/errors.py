"""The errors of the bundle and of every upload to the Hub (import-light: the data CLI raises them too)."""

import errno

# How a failed allocation reads once torch, safetensors (Rust) or the OS has put it into words.
OUT_OF_MEMORY_SIGNS = ("cannot allocate memory", "can't allocate memory", "out of memory", "os error 12",
                       "not enough memory")


class BundleError(ValueError):
    """A saved model folder cannot be loaded: it is incomplete, tampered with, or does not fit this version of
    MMGCS (or, as BundleMemoryError, this machine); the message says which and what to do."""


class BundleMemoryError(BundleError, MemoryError):
    """The machine (or the process's memory limit) has too little memory to load a bundle; the bundle is fine.
    Also a MemoryError, so code that handles running out of memory still sees it as that."""


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub cannot be reached; the message says where the local copy is."""


class PushError(RuntimeError):
    """An upload to the Hub (a model bundle or a dataset) failed after everything was saved locally; the message
    says where the local copy is and how to upload it later."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a failed allocation: a MemoryError, ENOMEM, or a
    library's error saying so (torch's "can't allocate memory", safetensors' "Cannot allocate memory (os error
    12)"), rather than a damaged file or a wrong config."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM):
            return True
        if any(sign in str(error).lower() for sign in OUT_OF_MEMORY_SIGNS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


__all__ = ["BundleError", "BundleMemoryError", "HubUnavailableError", "PushError", "is_out_of_memory"]
