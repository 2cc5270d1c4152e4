"""The model bundle on disk and on the Hub, each job in one file:

- `bundle.py`: save the files, strict load, the checks a bundle passes before anything is built;
- `config_values.py`: every ModelConfig field of a loaded bundle within its domain (choices, finite ranges);
- `weights.py`: model.safetensors' header checked against the model before any read, then the tensors copied in;
- `memory.py`: running out of memory while loading, reported as memory (how much the bundle needs);
- `ids.py`: the Hub-id rule (`owner/name` vs a local folder);
- `push.py`: upload a saved bundle, a model or a finished run's bundle (offline: a clear error saying where it is);
- `card.py`: the model card, its model-index and the one metrics-table builder;
- `errors.py`: BundleError (BundleMemoryError), HubUnavailableError, PushError.

The errors and `is_hub_id` load at once (the data CLI needs only them); every other name loads its module on
first use, so `import mmgcs.hub` does not import torch.
"""

from mmgcs.lazy import lazy_exports
from mmgcs.hub.errors import BundleError, BundleMemoryError, HubUnavailableError, PushError
from mmgcs.hub.ids import default_bundle_dir, is_hub_id

_LAZY = {
    **dict.fromkeys(("BUNDLE_PATTERNS", "CARD_NAME", "CONFIG_NAME", "LOAD_OVERRIDABLE", "TOKENIZER_FILES",
                     "WEIGHTS_NAME", "check_buildable", "check_bundle_files", "config_dict", "load_bundle",
                     "read_config", "read_config_and_meta", "read_state_dict", "resolve_bundle", "save_bundle_files"),
                    "mmgcs.hub.bundle"),
    **dict.fromkeys(("push_bundle", "push_model", "push_run_bundle"), "mmgcs.hub.push"),
    **dict.fromkeys(("METRIC_NAMES", "card_metadata", "eval_results", "fill_model_card", "metrics_table",
                     "model_card", "model_index", "pipeline_tag", "render_model_card"), "mmgcs.hub.card"),
}

__getattr__ = lazy_exports("mmgcs.hub", globals(), _LAZY)


__all__ = ["BundleError", "BundleMemoryError", "HubUnavailableError", "PushError", "default_bundle_dir", "is_hub_id", *sorted(_LAZY)]
