"""Raw plots and posters → the tensors a GenreClassifier takes, from the settings stored in the bundle."""

from typing import Any, Optional

import torch
from timm.data import create_transform

# The template check lives with the other settings checks; imported here for callers of its old home.
from mmgcs.config import TEXT_FIELDS, ModelConfig, check_text_template  # noqa: F401

# Training augmentation for posters: mild crops that keep most of the artwork and the poster's 2:3 shape
# (the crop is then squashed to a square like at eval), flips, light colour jitter. timm's ImageNet default
# (scale down to 8 % of the image) would often cut away the title and the faces that carry the genre.
TRAIN_SCALE = (0.6, 1.0)
TRAIN_RATIO = (0.55, 0.8)
TRAIN_COLOR_JITTER = 0.2

# The names timm's transforms resolve (timm.data.transforms.str_to_interp_mode): a bundle's `interpolation`.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")
# timm's eval crop modes. Posters are ~2:3: "squash" resizes the whole poster to a square (keeps title and
# artwork), "center" crops the middle, "border" pads to a square.
CROP_MODES = ("squash", "center", "border")


def image_transform(cfg: ModelConfig, train: bool = False):
    """timm's eval (or train) transform for the bundle's image size / mean / std / interpolation."""
    if cfg.image_mean is None or cfg.image_std is None or not cfg.interpolation:
        raise ValueError(
            "The model config has no resolved image preprocessing (image_mean/image_std/interpolation); "
            "build models with mmgcs.create_model(...) or load them with GenreClassifier.from_pretrained(...)"
        )
    common = dict(
        input_size=(3, cfg.image_size, cfg.image_size),
        interpolation=cfg.interpolation,
        mean=tuple(cfg.image_mean),
        std=tuple(cfg.image_std),
    )
    if train:
        return create_transform(
            is_training=True, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, hflip=0.5, color_jitter=TRAIN_COLOR_JITTER, **common
        )
    return create_transform(is_training=False, crop_pct=cfg.image_crop_pct, crop_mode=cfg.image_crop_mode, **common)


def tokenize(tokenizer, cfg: ModelConfig, plots: list[Optional[str]]) -> dict[str, torch.Tensor]:
    texts = [p if isinstance(p, str) else "" for p in plots]
    enc = tokenizer(
        texts, padding="longest", truncation=True, max_length=cfg.max_text_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def compose_text(template: str, plot: Optional[str], title: Optional[str] = None) -> Optional[str]:
    """The text the tower reads for one movie: a missing plot stays missing; a missing title is left out."""
    if not plot_present(plot) or template == "{plot}" or not (isinstance(title, str) and title.strip()):
        return plot
    return template.format(plot=plot, title=title.strip())


def plot_present(plot: Any) -> bool:
    return isinstance(plot, str) and bool(plot.strip())


def check_plot(plot: Any, index: int) -> None:
    if plot is not None and not isinstance(plot, str):
        raise TypeError(f"plot #{index} must be a string or None, got {type(plot).__name__}")
