"""The errors of the bundle and of every upload to the Hub (import-light: the data CLI raises them too)."""


class BundleError(ValueError):
    """A saved model folder is incomplete, tampered with, or does not fit this version of MMGCS."""


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub cannot be reached; the message says where the local copy is."""


class PushError(RuntimeError):
    """An upload to the Hub (a model bundle or a dataset) failed after everything was saved locally; the message
    says where the local copy is and how to upload it later."""


__all__ = ["BundleError", "HubUnavailableError", "PushError"]
