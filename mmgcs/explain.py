"""Why a movie got its genres: the plot's words, the plot-versus-poster share and the poster's regions.

    predictor.predict(plot="...", poster="poster.jpg", explain=True)["explanation"]["genres"]["Horror"]

For each explained genre (the predicted ones, or those asked for):

- **words** (`lexical`): the n-grams (words and word pairs) that pushed the genre's logit most up and down, with
  their signed contributions. Exact for the lexical branch (`mmgcs.models.lexical`): n-gram j adds
  `lexical_weight × tfidf_j × W[j, genre]` to the logit, and these plus `lexical_weight × bias` sum to the branch's
  part of the logit. It does **not** cover the neural text tower (the sentence encoder's part of the logit is not
  split into words); that part shows only in the plot's share below. A model without a lexical branch has none.
  `words` spreads each n-gram's contribution evenly over the words it spans, for highlighting the plot.
- **plot vs poster** (`plot_effect`, `poster_effect`, `plot_share`): an ablation on the fused logit. The plot's
  effect is the fused logit minus the logit with the plot withheld (the poster-only view), the poster's effect the
  fused logit minus the logit with the poster withheld (the plot-only view); `plot_share` is
  `|plot effect| / (|plot effect| + |poster effect|)` (1 or 0 when the movie has only one of them).
- **poster regions** (`occlusion`): a `grid × grid` map; each cell is the genre's score (probability) with the
  whole poster minus the score with that cell of the model's input painted the poster's mean colour: positive
  where the region supported the genre. All cells go through the image tower as one batch.

It runs the text tower once, the image tower on 1 + grid² posters and the small head once, on one movie; it
sits beside `mmgcs.inference` (which calls it) and takes the `Predictor` (its model and its `GenreProcessor`) rather
than importing it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Optional

import torch

from mmgcs.models.lexical import TOKEN_PATTERN, hashed_id

DEFAULT_GRID = 7
TOP_K = 8
COVERS = (
    "Word contributions are exact for the lexical branch's part of the logit (lexical_weight x tf-idf x weight per "
    "word or word pair); the neural text tower's part is not split into words and shows only in plot_share."
)
_IMAGE_CHUNK = 32  # occluded posters per image-tower call: bounds the memory of a large grid


# ------------------------------------------------------------------------------------------------- words
def lexical_contributions(model, text: str) -> Optional[dict]:
    """The lexical branch's part of each genre's logit for `text`, n-gram by n-gram: `{"names": [n-gram(s) per
    hashed id], "contributions": (T, L) tensor, "bias": (L,) tensor}` (both scaled by `lexical_weight`), or None
    when the model has no lexical branch or does not use it."""
    branch, weight = getattr(model, "lexical", None), float(getattr(model.config, "lexical_weight", 0.0) or 0.0)
    if branch is None or not weight or not text:
        return None
    features = branch.featurize([text])
    ids, values = features["lexical_ids"][0], features["lexical_values"][0]
    keep = values != 0
    ids, values = ids[keep], values[keep]
    rows = branch.weight.detach().float().cpu()[ids]  # (T, L)
    contributions = weight * values.unsqueeze(1) * rows
    return {"names": _ngram_names(branch, text, ids.tolist()), "ids": ids.tolist(), "contributions": contributions,
            "bias": weight * branch.bias.detach().float().cpu()}


def _ngram_names(branch, text: str, ids: list[int]) -> list[str]:
    """Hashed ids back to the n-grams of `text` they came from (the plot's own n-grams, run through the branch's
    analyzer and hasher); colliding n-grams are joined with " / "."""
    by_id: dict[int, list[str]] = {}
    for gram in dict.fromkeys(branch.analyze(text)):
        by_id.setdefault(hashed_id(gram, branch.n_features), []).append(gram)
    return [" / ".join(by_id.get(i, [f"#{i}"])) for i in ids]


def word_spans(branch, text: str, ids: list[int], contributions: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, per-genre score (L,)) for each word of `text`: every n-gram occurrence's share of its id's
    contribution, spread evenly over the words it spans (so the words' scores add up to the n-grams')."""
    pattern = re.compile(TOKEN_PATTERN)
    words = [(m.start(), m.end(), m.group().lower()) for m in pattern.finditer(text)]
    occurrences = []  # (first word, n, gram)
    for n in range(1, branch.ngrams + 1):
        occurrences += [(i, n, " ".join(w for _, _, w in words[i:i + n])) for i in range(len(words) - n + 1)]
    if not occurrences:
        return []
    hashed = [hashed_id(gram, branch.n_features) for _, _, gram in occurrences]
    counts = Counter(hashed)
    row_of = {index: r for r, index in enumerate(ids)}
    scores = torch.zeros(len(words), contributions.shape[1])
    for (first, n, _), index in zip(occurrences, hashed):
        if index in row_of:
            scores[first:first + n] += contributions[row_of[index]] / (counts[index] * n)
    return [(start, end, scores[i]) for i, (start, end, _) in enumerate(words)]


def _top_ngrams(lexical: dict, j: int, top_k: int) -> dict:
    column = lexical["contributions"][:, j]
    order = torch.argsort(column, descending=True).tolist()
    pairs = [(lexical["names"][i], float(column[i])) for i in order]
    return {
        "logit": float(column.sum() + lexical["bias"][j]),
        "bias": float(lexical["bias"][j]),
        "up": [[name, c] for name, c in pairs[:top_k] if c > 0],
        "down": [[name, c] for name, c in reversed(pairs[-top_k:]) if c < 0],
    }


# ------------------------------------------------------------------------------------------------ poster
def cell_edges(size: int, grid: int) -> list[int]:
    """Pixel boundaries of `grid` near-equal cells along a side of `size` pixels."""
    return [round(i * size / grid) for i in range(grid + 1)]


def occluded(pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """`pixels` (3, H, W), the model's input, → (grid², 3, H, W): one copy per cell, row by row, with that cell
    painted the poster's mean colour (which removes the region's shapes and its colour contrast)."""
    fill = pixels.mean(dim=(1, 2), keepdim=True)
    rows, cols = cell_edges(pixels.shape[1], grid), cell_edges(pixels.shape[2], grid)
    out = pixels.unsqueeze(0).repeat(grid * grid, 1, 1, 1)
    for r in range(grid):
        for c in range(grid):
            out[r * grid + c, :, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = fill
    return out


def _image_features(model, pixels: torch.Tensor, fast=None) -> torch.Tensor:
    """The image tower over `pixels` in chunks: through the predictor's fast path when it has one (the scores it
    serves, ~2x faster on CPU), else eagerly as the predict path runs it."""
    if fast is not None:
        return torch.cat([fast.encode_image(chunk) for chunk in pixels.split(_IMAGE_CHUNK)])
    if pixels.device.type == "cpu":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return torch.cat([model.encode_image(chunk) for chunk in pixels.split(_IMAGE_CHUNK)])


# ------------------------------------------------------------------------------------------- the rows
def _feature_rows(model, batch: dict, grid: int, fast=None) -> tuple[dict, bool, bool]:
    """One head batch for one movie: row 0 both inputs, row 1 the plot alone (poster withheld), row 2 the poster
    alone (plot withheld), then one row per occluded poster cell. Each tower runs once (the image tower on the
    poster and its occluded copies as one batch)."""
    has_text = model.text_tower is not None and bool(batch["text_mask"][0])
    has_image = model.image_tower is not None and bool(batch["image_mask"][0])
    cells = occluded(batch["pixel_values"][0], grid) if has_image and grid else None
    n = 3 + (0 if cells is None else cells.shape[0])
    rows: dict[str, Any] = {}
    if has_text:
        encode = fast.encode_text if fast is not None else model.encode_text
        text = encode(batch["input_ids"], batch["attention_mask"])
        rows["text_features"] = text.expand(n, -1)
        rows["text_mask"] = torch.tensor([True, True, False] + [True] * (n - 3), device=text.device)
        for key in ("lexical_ids", "lexical_values"):
            if key in batch:
                rows[key] = batch[key].expand(n, -1)
    if has_image:
        pixels = batch["pixel_values"][:1] if cells is None else torch.cat([batch["pixel_values"][:1], cells])
        image = _image_features(model, pixels, fast)
        rows["image_features"] = torch.cat([image[:1].expand(3, -1), image[1:]])
        rows["image_mask"] = torch.tensor([True, False, True] + [True] * (n - 3), device=image.device)
    return rows, has_text, has_image


def _share(logits: torch.Tensor, j: int, has_text: bool, has_image: bool) -> dict:
    fused = float(logits[0, j])
    if not (has_text and has_image):
        return {"logit": fused, "plot_effect": None, "poster_effect": None, "plot_share": 1.0 if has_text else 0.0}
    plot_effect, poster_effect = fused - float(logits[2, j]), fused - float(logits[1, j])
    total = abs(plot_effect) + abs(poster_effect)
    return {"logit": fused, "plot_effect": plot_effect, "poster_effect": poster_effect,
            "plot_share": abs(plot_effect) / total if total else 0.5}


# ------------------------------------------------------------------------------------------------ public
@torch.inference_mode()
def explain_movie(predictor, text: Optional[str], poster: Any, genres: list[str], grid: int = DEFAULT_GRID,
                  top_k: int = TOP_K) -> dict:
    """The explanation of one movie's `genres` (see the module docstring). `text` is what the text tower reads
    (the plot under the model's template: `Predictor` composes it); `grid=0` skips the occlusion map."""
    model = predictor.model
    labels = list(model.config.labels)
    unknown = [g for g in genres if g not in labels]
    if unknown:
        raise ValueError(f"Cannot explain {unknown}: not genres of this model; choose from {labels}")
    batch = {k: v.to(model.device) for k, v in predictor.processor([text], [poster]).items()}
    rows, has_text, has_image = _feature_rows(model, batch, grid, getattr(predictor, "fast", None))
    logits = model(**rows)["logits"].float().cpu()
    probs = model.probabilities(logits)
    lexical = lexical_contributions(model, text) if has_text else None
    spans = word_spans(model.lexical, text, lexical["ids"], lexical["contributions"]) if lexical else []
    out = {}
    for genre in genres:
        j = labels.index(genre)
        entry = {"score": float(probs[0, j]), **_share(logits, j, has_text, has_image)}
        entry["lexical"] = _top_ngrams(lexical, j, top_k) if lexical else None
        entry["words"] = [[start, end, float(s[j])] for start, end, s in spans if float(s[j]) != 0.0]
        entry["occlusion"] = (
            (probs[0, j] - probs[3:, j]).reshape(grid, grid).tolist() if has_image and grid else None
        )
        out[genre] = entry
    return {"text": text if has_text else None, "covers": COVERS, "grid": grid if has_image else 0, "genres": out}


def genres_to_explain(result: dict) -> list[str]:
    """The predicted genres, or the top-scoring one when none passed its threshold."""
    return list(result["genres"]) or [max(result["scores"], key=result["scores"].get)]


__all__ = ["COVERS", "DEFAULT_GRID", "cell_edges", "explain_movie", "genres_to_explain", "lexical_contributions",
           "occluded", "word_spans"]
