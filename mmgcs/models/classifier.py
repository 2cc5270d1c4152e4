"""GenreClassifier: optional text tower + optional image tower + fusion head → genre logits.

Text-only, poster-only and fused models are all this one class, saved and loaded as one Hub bundle
(`model.safetensors`, `config.json`, tokenizer files, `README.md`).
"""
# No `from __future__ import annotations` here: the hub mixin reads the `config: ModelConfig` annotation at
# class creation, and a string annotation would make the saved config come back as a plain dict.

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from mmgcs.config import ConfigError, ModelConfig, model_config_from_dict
from mmgcs.hub.bundle import load_bundle, save_bundle_files
from mmgcs.hub.card import model_card
from mmgcs.hub.push import push_bundle, push_model
from mmgcs.inference import Predictor
from mmgcs.decisions import decision_thresholds
from mmgcs.models.fusion import create_fusion
from mmgcs.models.image import create_image_tower, image_tower_from_config
from mmgcs.models.config_checks import check_model_config
from mmgcs.models.image_prefix import features_from_prefix as image_from_prefix
from mmgcs.models.lexical import LexicalBranch
from mmgcs.models.losses import check_loss_for_task, loss_options, multilabel_loss
from mmgcs.models.text import create_text_tower, text_tower_from_config
from mmgcs.models.tower import Tower

class GenreClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mmgcs",
    tags=["mmgcs", "movie-genre-classification", "multimodal"],
    license="apache-2.0",
):
    """Movie plot and/or poster → genre logits (multi-label by default).

    Build a new model with `mmgcs.create_model(labels=[...])`; load a saved one with
    `GenreClassifier.from_pretrained(folder_or_repo_id)`. `forward(**batch)` takes tensors and returns
    `{"loss", "logits"}`; raw movies become tensors through its processor (`mmgcs.processor.GenreProcessor`), and
    `predict` runs both through `mmgcs.inference.Predictor`.
    """

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Any = None,
        text_tower: Optional[Tower] = None,
        image_tower: Optional[Tower] = None,
    ):
        super().__init__()
        check_model_config(config)
        self.config = config
        self.tokenizer = tokenizer
        if text_tower is None and config.text_tower != "none":
            text_tower = text_tower_from_config(config)
        if image_tower is None and config.image_tower != "none":
            image_tower = image_tower_from_config(config)
        self.text_tower = text_tower
        self.image_tower = image_tower
        dims = [t.out_dim for t in (text_tower, image_tower) if t is not None]
        self.fusion = create_fusion(
            config.fusion, dims, len(config.labels), config.fusion_dim, config.dropout, fusion_heads=config.fusion_heads
        )
        self.lexical = (
            LexicalBranch(config.lexical_features, len(config.labels), config.lexical_ngrams, config.lexical_min_df)
            if config.lexical else None
        )
        pos_weight = torch.tensor(config.pos_weight, dtype=torch.float32) if config.pos_weight is not None else None
        # Not persistent: config.json is the one source of truth for pos_weight.
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        # How the head learns (train.loss): a training choice, not part of the bundle; BCE unless set_loss says.
        self.loss_options: dict = loss_options()

    # ----------------------------------------------------------------------------------------- encoding
    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.text_tower is None:
            raise ValueError("This model has no text tower (text_tower='none'); it takes posters only")
        return self.text_tower(input_ids=input_ids, attention_mask=attention_mask)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.image_tower is None:
            raise ValueError("This model has no image tower (image_tower='none'); it takes plots only")
        return self.image_tower(pixel_values)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        text_features: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,  # accepted from tokenizer output; unused (single segment)
        lexical_ids: Optional[torch.Tensor] = None,
        lexical_values: Optional[torch.Tensor] = None,
        text_hidden: Optional[torch.Tensor] = None,  # a cached prefix (mmgcs.features.prefix), with attention_mask
        text_frozen_means: Optional[torch.Tensor] = None,
        image_hidden: Optional[torch.Tensor] = None,  # a cached image prefix (mmgcs.features.image_prefix)
    ) -> dict[str, Optional[torch.Tensor]]:
        batch_size = next(
            (t.shape[0] for t in (input_ids, pixel_values, text_features, image_features, labels, text_hidden,
                                  image_hidden) if t is not None), None
        )
        if batch_size is None:
            raise ValueError(
                "Empty batch: pass input_ids/attention_mask, pixel_values, or cached text_features/image_features"
            )
        parts = []  # (features or None, row mask, tower) per tower, text first
        if self.text_tower is not None:
            if input_ids is not None and attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            encode, inputs = self.encode_text, (input_ids, attention_mask)
            if text_hidden is not None:  # only the tower's trainable top layers run, from the bottom's cached output
                encode, inputs = self.text_tower.forward_from_prefix, (text_hidden, attention_mask, text_frozen_means)
            parts.append((*self._features(text_features, encode, inputs, text_mask, batch_size), self.text_tower))
        elif input_ids is not None or text_features is not None:
            raise ValueError("This model has no text tower (text_tower='none'); drop input_ids/text_features from the batch")
        if self.image_tower is not None:
            encode, inputs = self.encode_image, (pixel_values,)
            if image_hidden is not None:  # only the tower's trainable top runs, from the bottom's cached feature maps
                encode, inputs = lambda maps: image_from_prefix(self.image_tower, maps, image_mask), (image_hidden,)
            parts.append((*self._features(image_features, encode, inputs, image_mask, batch_size), self.image_tower))
        elif pixel_values is not None or image_features is not None:
            raise ValueError("This model has no image tower (image_tower='none'); drop pixel_values/image_features from the batch")
        # A modality missing from the whole batch still needs features of the right shape (masked out by the head).
        features = [f if f is not None else torch.zeros(batch_size, t.out_dim, device=self.device) for f, _, t in parts]
        masks = [m for _, m, _ in parts]
        has_text = masks[0] if self.text_tower is not None else None
        if self.training and self.config.modality_dropout > 0 and len(masks) == 2:
            masks = self._drop_modality(masks)
        fused = self.fusion(features, masks)
        # The head learns on its own loss; the lexical branch is fitted in closed form (see mmgcs.models.lexical).
        loss = self.loss(fused, labels) if labels is not None else None
        logits = fused
        if self.lexical is not None and lexical_ids is not None and self.config.lexical_weight:
            lexical = self.lexical(lexical_ids, lexical_values) * has_text.unsqueeze(1).to(fused)
            logits = fused + self.config.lexical_weight * lexical
        return {"loss": loss, "logits": logits}

    def _features(self, cached: Optional[torch.Tensor], encode, inputs: tuple, mask: Optional[torch.Tensor],
                  batch_size: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """One modality's (features, row mask): its cached features, else its tower over the raw input when some
        row needs it, else (None, all False)."""
        if cached is not None:
            return cached.to(self.device, torch.float32), self._mask(mask, batch_size)
        if inputs[0] is not None and self._needed(mask):
            return encode(*inputs), self._mask(mask, batch_size)
        return None, torch.zeros(batch_size, dtype=torch.bool, device=self.device)

    def _needed(self, mask: Optional[torch.Tensor]) -> bool:
        """Whether to run a tower. At inference a tower whose input is missing from every row is skipped
        (a plot-only prediction does not pay for the image backbone); in training it always runs, so every
        parameter stays in the graph (DistributedDataParallel requires it)."""
        return self.training or mask is None or bool(mask.any())

    def _mask(self, mask: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        if mask is None:
            return torch.ones(batch_size, dtype=torch.bool, device=self.device)
        if mask.shape != (batch_size,):
            raise ValueError(f"A modality mask must have shape ({batch_size},), got {tuple(mask.shape)}")
        return mask.to(self.device, torch.bool)

    def _drop_modality(self, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hide one modality of a random subset of the rows that have both, so the model learns to predict
        from either alone (the Space and real data have movies without a poster or plot)."""
        text, image = masks
        both = text & image
        drop = both & (torch.rand(both.shape, device=both.device) < self.config.modality_dropout)
        drop_text = drop & (torch.rand(both.shape, device=both.device) < 0.5)
        drop_image = drop & ~drop_text
        return [text & ~drop_text, image & ~drop_image]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(self.config.labels)
        if self.config.task == "singlelabel":
            if labels.dim() == 2:  # one-hot
                labels = labels.argmax(-1)
            if labels.shape != (logits.shape[0],):
                raise ValueError(f"singlelabel labels must have shape (batch,), got {tuple(labels.shape)}")
            return F.cross_entropy(logits, labels.long().to(logits.device))
        if labels.shape != logits.shape:
            raise ValueError(f"multilabel labels must be multi-hot of shape (batch, {n}), got {tuple(labels.shape)}")
        return multilabel_loss(logits, labels.to(logits), self.loss_options, self.pos_weight)

    def set_loss(self, options: dict) -> None:
        """Train the head with another multi-label loss (``loss_options(...)``: focal, asymmetric or BCE)."""
        check_loss_for_task(self.config.task, options.get("kind", "bce"))
        self.loss_options = dict(options)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, -1) if self.config.task == "singlelabel" else torch.sigmoid(logits)

    def decision_thresholds(self) -> list[float]:
        return decision_thresholds(self.config).tolist()

    # ---------------------------------------------------------------------------------------- inference
    def predict(self, plot: Optional[str] = None, poster: Any = None, by_modality: bool = False,
                title: Optional[str] = None, explain: bool = False) -> dict:
        """One movie → `{"scores": {genre: probability}, "genres": [predicted genres]}` (see mmgcs.inference;
        `explain=True` adds `"explanation"`, see mmgcs.explain). `title` is read only when `config.text_template`
        uses it."""
        return Predictor(self).predict(plot, poster, by_modality=by_modality, title=title, explain=explain)

    def predict_batch(self, plots: Optional[list] = None, posters: Optional[list] = None, batch_size: int = 32,
                      by_modality: bool = False, titles: Optional[list] = None, explain: bool = False) -> list[dict]:
        return Predictor(self).predict_batch(plots, posters, batch_size=batch_size, by_modality=by_modality,
                                             titles=titles, explain=explain)

    # ------------------------------------------------------------- the hub mixin: save / load / push (mmgcs.hub)
    def save_pretrained(self, save_directory: Union[str, Path], *, config=None, repo_id: Optional[str] = None,
                        push_to_hub: bool = False, model_card_kwargs: Optional[dict] = None, **push_to_hub_kwargs):
        """Write the bundle: model.safetensors, config.json, tokenizer files, README.md.

        `model_card_kwargs` may carry `metrics` (test metrics → the card's model-index), `dataset_id`, `repo_id`.
        """
        if config is not None:
            raise TypeError("save_pretrained takes no config: the bundle's config.json is always model.config")
        card_kwargs = {**({"repo_id": repo_id} if repo_id else {}), **(model_card_kwargs or {})}
        super().save_pretrained(save_directory, model_card_kwargs=card_kwargs)
        if push_to_hub:
            return push_bundle(save_directory, repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        save_bundle_files(self, Path(save_directory))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return model_card(self.config, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, Path],
        *,
        force_download: bool = False,
        token: Union[str, bool, None] = None,
        cache_dir: Union[str, Path, None] = None,
        local_files_only: bool = False,
        revision: Optional[str] = None,
        map_location: str = "cpu",
        **config_overrides,
    ) -> "GenreClassifier":
        """Load a bundle from a folder or a Hub repo id: towers rebuilt from the stored configs (no backbone
        download), weights loaded strictly (a missing, extra or mis-shaped tensor is an error), eval mode.

        `config_overrides` may change inference-only fields (e.g. `thresholds`, `threshold`).
        """
        return cls._from_pretrained(
            model_id=pretrained_model_name_or_path, force_download=force_download, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, revision=revision, map_location=map_location, overrides=config_overrides,
        )

    @classmethod
    def _from_pretrained(cls, *, model_id, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location="cpu", overrides=None, **_mixin_kwargs):
        # The mixin's hook, loading strictly through mmgcs.hub (its own loader is strict=False by default).
        return load_bundle(cls, model_id, force_download=force_download, token=token, cache_dir=cache_dir,
                           local_files_only=local_files_only, revision=revision, map_location=map_location,
                           overrides=overrides)

    def push_to_hub(self, repo_id: str, *, save_directory: Union[str, Path, None] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, commit_message: str = "Upload MMGCS genre classifier",
                    model_card_kwargs: Optional[dict] = None, **kwargs) -> str:
        """Save the bundle to `save_directory` (default `./mmgcs-bundles/<owner>--<name>`), then upload it.

        Offline, raises `mmgcs.hub.HubUnavailableError` saying where the bundle was saved.
        """
        return push_model(self, repo_id, save_directory=save_directory, private=private, token=token,
                          commit_message=commit_message, model_card_kwargs=model_card_kwargs, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return f"labels={len(c.labels)}, task={c.task}, text={c.text_tower}, image={c.image_tower}, fusion={c.fusion}"


def create_model(labels: Optional[list] = None, config: Optional[ModelConfig] = None, **overrides) -> GenreClassifier:
    """A new GenreClassifier: towers resolved and (unless `pretrained=False`) loaded with pretrained weights,
    a fresh fusion head. Start from `config` (e.g. a RunConfig's `.model`) or the defaults; `overrides` are
    ModelConfig fields (`fusion="concat"`, `image_tower="none"`, ...). `config` itself is not modified."""
    base = dataclasses.asdict(config) if config is not None else {}
    try:
        cfg = model_config_from_dict({**base, **overrides})
    except ConfigError as e:
        raise TypeError(f"create_model: {e}") from None
    if labels is not None:
        cfg.labels = list(labels)
    check_model_config(cfg)
    tokenizer = text_tower = image_tower = None
    if cfg.text_tower != "none":
        text_tower, tokenizer = create_text_tower(cfg)
    if cfg.image_tower != "none":
        image_tower = create_image_tower(cfg)
    return GenreClassifier(cfg, tokenizer=tokenizer, text_tower=text_tower, image_tower=image_tower)


__all__ = ["GenreClassifier", "create_model"]
