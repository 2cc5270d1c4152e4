"""Start a new model from trained single-modality bundles: "the late fusion of the best text and poster models".

`init_from_bundles(model, text_bundle=..., image_bundle=...)` copies a plot model's text tower (with the tokenizer
its embeddings index) and a poster model's image tower into `model`. When `model` uses the "late" fusion and a
bundle is itself a one-tower "late" model, that bundle's whole head (genre logits → projection → classifier
columns) becomes the matching branch of the fused head, rows mapped by genre name.

The late head adds one shared bias to the sum of its branches, so it cannot hold both bundles' biases: with one
bundle's head loaded the model reproduces that bundle's logits exactly when the other modality is missing; with
both, the bias is their mean and each modality alone is off by half the difference of the two biases (the same
shift for every movie, so each genre's ranking of movies is that bundle's). Training the fused head then fits it.
"""

import logging
from typing import Optional

import torch

from mmgcs.hub import HubUnavailableError
from mmgcs.models.classifier import GenreClassifier
from mmgcs.models.fusion import LateFusion

logger = logging.getLogger(__name__)

# Fields that decide a tower's weights' meaning and its inputs: a copied tower must see what it was trained on.
# (glove_path is left out: the vocabulary travels with the tokenizer, and vocab_size is compared.)
TOWER_FIELDS = {
    "text": ("text_tower", "text_backbone_config", "max_text_length", "text_template"),
    "image": ("image_tower", "image_size", "image_mean", "image_std", "interpolation", "image_crop_mode",
              "image_crop_pct"),
}
# ... and those that only one kind of tower reads.
TOWER_TYPE_FIELDS = {
    "hf": ("text_pooling",),
    "bilstm": ("word_embedding_dim", "lstm_hidden_dim", "vocab_size"),
    "timm": ("image_backbone", "image_backbone_kwargs"),
}
# Backbone-config entries that say how a config was written, not what the network is.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}
CONFIG_FIELD = {"text": "model.init_text_from", "image": "model.init_image_from"}


class InitFromError(ValueError):
    """A bundle cannot initialise this model (wrong modality, other tower or genres); the message names both."""


def init_from_config(model) -> dict:
    """Apply the model's own `config.init_text_from` / `config.init_image_from` (the engine calls this right after
    building a new model). Returns what was loaded (see `init_from_bundles`)."""
    return init_from_bundles(model, text_bundle=model.config.init_text_from or None,
                             image_bundle=model.config.init_image_from or None)


def init_from_bundles(model, text_bundle: Optional[str] = None, image_bundle: Optional[str] = None) -> dict:
    """Load the text tower of `text_bundle` and the image tower of `image_bundle` (folders or Hub ids) into
    `model`, and their heads into a late fusion's branches when both are "late". Checks everything before
    changing anything. Returns `{"text": {"bundle", "tower", "head"}, "image": {...}}` for the given bundles."""
    sources = {m: b for m, b in (("text", text_bundle), ("image", image_bundle)) if b}
    plans = {}
    for modality, source in sources.items():
        bundle = _load(GenreClassifier, source, modality)
        _check(model, bundle, modality, source)
        plans[modality] = (source, bundle, _head_plan(model, bundle, modality, source))
    report = {}
    for modality, (source, bundle, head_index) in plans.items():
        target = _tower(model, modality)
        target.load_state_dict(_tower(bundle, modality).state_dict(), strict=True)
        if modality == "text":
            model.tokenizer = bundle.tokenizer
        model.config.backbone_weights = {
            **(model.config.backbone_weights or {}),
            modality: f"MMGCS bundle {source} (its trained {modality} tower)",
        }
        report[modality] = {"bundle": str(source), "tower": True, "head": head_index is not None}
    heads = {m: (b, i) for m, (_, b, i) in plans.items() if i is not None}
    if heads:
        _load_late_heads(model, heads)
    for modality, entry in report.items():
        logger.info("%s tower%s from %s", modality.capitalize(),
                    " and its head (the late fusion's branch)" if entry["head"] else "", entry["bundle"])
    return report


def _load(cls, source: str, modality: str):
    try:
        return cls.from_pretrained(source)
    except HubUnavailableError as e:  # a RuntimeError elsewhere; here it is a setting to fix
        raise InitFromError(f"{CONFIG_FIELD[modality]}={source}: {e}") from None


def _tower(model, modality: str):
    return model.text_tower if modality == "text" else model.image_tower


def _comparable(field: str, value):
    if field == "text_backbone_config" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in _VOLATILE}
    return value


def _check(model, bundle, modality: str, source: str) -> None:
    field = CONFIG_FIELD[modality]
    other = "image" if modality == "text" else "text"
    if _tower(bundle, modality) is None:
        raise InitFromError(
            f"{field}={source}: that bundle has no {modality} tower (it reads {'posters' if modality == 'text' else 'plots'} "
            f"only); give it as {CONFIG_FIELD[other]} instead"
        )
    if _tower(model, modality) is None:
        raise InitFromError(f"{field}={source}: this model has no {modality} tower ({modality}_tower=none); "
                            f"set model.{modality}_tower or drop {field}")
    differs = []
    kind = getattr(model.config, f"{modality}_tower")
    for name in TOWER_FIELDS[modality] + TOWER_TYPE_FIELDS.get(kind, ()):
        mine, theirs = getattr(model.config, name), getattr(bundle.config, name)
        if _comparable(name, mine) != _comparable(name, theirs):
            differs.append(f"{name}: this model {_short(mine)} vs the bundle {_short(theirs)}")
    if differs:
        raise InitFromError(
            f"{field}={source}: its {modality} tower is not the one this model is built with ("
            + "; ".join(differs)
            + f"). Set the model's {modality} settings to the bundle's (its config.json) or use a bundle trained with them"
        )
    mine_state, theirs_state = _tower(model, modality).state_dict(), _tower(bundle, modality).state_dict()
    shapes = sorted(
        f"{k}: {tuple(theirs_state[k].shape) if k in theirs_state else 'absent'} vs {tuple(v.shape)}"
        for k, v in mine_state.items() if k not in theirs_state or theirs_state[k].shape != v.shape
    ) + sorted(f"{k}: extra in the bundle" for k in set(theirs_state) - set(mine_state))
    if shapes:  # settings agree but the weights do not (e.g. a backbone changed by the backbone's own library)
        raise InitFromError(f"{field}={source}: its {modality} tower's tensors do not fit this model's ("
                            + "; ".join(shapes[:5]) + f"{'; ...' if len(shapes) > 5 else ''})")
    if model.config.task != bundle.config.task:
        raise InitFromError(f"{field}={source}: the bundle is a {bundle.config.task} model, this one {model.config.task}; "
                            "use a bundle trained for the same task")
    mine, theirs = set(model.config.labels), set(bundle.config.labels)
    if mine != theirs:
        raise InitFromError(
            f"{field}={source}: the bundle predicts other genres than this model. Only in this model: "
            f"{sorted(mine - theirs)}; only in the bundle: {sorted(theirs - mine)}. Train both on the same dataset "
            "(or rename genres when building it, --rename-genre) so the genre names agree"
        )


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...}"


def _head_plan(model, bundle, modality: str, source: str) -> Optional[int]:
    """The index of the fused head's branch that takes the bundle's head, or None when the heads do not map."""
    towers = [m for m in ("text", "image") if _tower(bundle, m) is not None]
    if not isinstance(model.fusion, LateFusion):
        logger.info("%s: only the %s tower is loaded (this model's %r fusion has no per-modality branch)",
                    source, modality, model.config.fusion)
        return None
    if not isinstance(bundle.fusion, LateFusion) or towers != [modality]:
        logger.info("%s: only the %s tower is loaded (its head, %r over %s, does not map onto a late-fusion branch; "
                    "train the %s model with model.fusion=late to carry its head over)",
                    source, modality, bundle.config.fusion, "+".join(towers), modality)
        return None
    return [m for m in ("text", "image") if _tower(model, m) is not None].index(modality)


@torch.no_grad()
def _load_late_heads(model, heads: dict) -> None:
    """Copy each one-tower late head into its branch of the fused late head, genre rows in the model's order."""
    fused = model.fusion
    width = fused.PROJ
    linear = fused.classifier[-1]
    biases = []
    for bundle, k in heads.values():
        order = torch.tensor([bundle.config.labels.index(g) for g in model.config.labels])
        src = bundle.fusion.to(linear.weight.device)
        head, proj, cls = src.tower_heads[0][-1], src.projections[0][0], src.classifier[-1]
        dst_head, dst_proj = fused.tower_heads[k][-1], fused.projections[k][0]
        dst_head.weight.copy_(head.weight[order])
        dst_head.bias.copy_(head.bias[order])
        dst_proj.weight.copy_(proj.weight[:, order])
        dst_proj.bias.copy_(proj.bias)
        linear.weight[:, k * width:(k + 1) * width] = cls.weight[order]
        biases.append(cls.bias[order])
    linear.bias.copy_(torch.stack(biases).mean(0))


__all__ = ["InitFromError", "TOWER_FIELDS", "TOWER_TYPE_FIELDS", "init_from_bundles", "init_from_config"]
