"""The lexical branch: a TF-IDF logistic regression over the words and word pairs of the text, added to the fused
logits (``logits = fusion + lexical_weight * lexical``, where the text is present).

Why: a frozen sentence encoder summarises a plot in one vector and loses the telling words ("murder", "alien",
"musical"); a linear model over n-grams keeps them. On the shared TMDB data the two are complementary: averaging
them beat either alone by ~0.03 test micro-F1 (see the closing notes of issue #4 and configs/fusion.yaml).

Design choices:
- Hashed n-grams instead of a vocabulary: the branch is then tensors only (idf, weights, bias), saved in
  ``model.safetensors`` with everything else and restored by ``save_state``/``--resume`` and ``from_pretrained``
  without any extra file, pickle or JSON vocabulary. The n-grams and ids are those of scikit-learn's
  ``HashingVectorizer(lowercase=True, ngram_range=(1, ngrams), alternate_sign=False, norm=None)`` (its token
  pattern, n-gram order and MurmurHash3 index rule), computed here with ``mmh3``: predicting then needs no
  scikit-learn (which imports SciPy's stats, 75 MB of a serving process and 0.7 s of its start-up; only the fit
  imports it). tests/test_lexical_hashing.py holds ids, counts and TF-IDF values equal to scikit-learn's, bit for
  bit.
- Fitted in closed form before the head trains (one L2-regularised logistic regression per genre, scikit-learn
  ``liblinear``), never by gradient: its parameters do not require grad, so the optimizer and DDP leave them alone
  and DDP's start-up broadcast copies the main process's fit to every rank.
- The fused head is trained on its own loss; ``lexical_weight`` is tuned afterwards on the validation split (the
  engine's ``_tune_lexical_weight``), like the decision thresholds.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import mmh3
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# A genre with no positive (or no negative) training example cannot be fitted; its logit is then a constant far
# on that side.
_CONSTANT_LOGIT = 10.0
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: runs of 2+ word characters
_TOKENS = re.compile(TOKEN_PATTERN)
_INT32_MIN = -(2**31)


def ngrams_of(text: str, ngrams: int) -> list[str]:
    """The lower-cased words of `text`, then its word pairs, ... up to `ngrams` words, joined by one space (in
    scikit-learn's word-analyzer order)."""
    words = _TOKENS.findall(text.lower())
    grams = list(words)
    for n in range(2, min(ngrams, len(words)) + 1):
        grams.extend(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def hashed_id(gram: str, n_features: int) -> int:
    """The column of n-gram `gram`: |signed 32-bit MurmurHash3 (seed 0) of its UTF-8| mod `n_features`, with
    scikit-learn's rule for the one hash whose absolute value does not fit in 32 bits."""
    h = mmh3.hash(gram.encode("utf-8"), 0, signed=True)
    return (2147483647 - (n_features - 1)) % n_features if h == _INT32_MIN else abs(h) % n_features


def l2_normalized(values: np.ndarray) -> np.ndarray:
    """float32 `values` / their L2 norm, summed in float64 one value after the other (as scikit-learn's
    `normalize` does for a sparse row, so the digits are the same); an all-zero row is left as it is."""
    total = np.cumsum((values * values).astype(np.float64))[-1] if values.size else 0.0
    return values if total == 0.0 else (values / np.sqrt(total)).astype(np.float32)


class LexicalBranch(nn.Module):
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised rows) over hashed 1..`ngrams`-grams → per-genre logits."""

    def __init__(self, n_features: int, n_labels: int, ngrams: int = 2, min_df: int = 2):
        super().__init__()
        if n_features <= 0 or ngrams < 1 or min_df < 1:
            raise ValueError(
                f"lexical branch: n_features ({n_features}), ngrams ({ngrams}) and min_df ({min_df}) must be positive"
            )
        self.n_features, self.ngrams, self.min_df = int(n_features), int(ngrams), int(min_df)
        # Parameters (not buffers) without grad: saved and loaded with the model, broadcast once by DDP at start-up
        # (buffers would be re-broadcast on every forward), skipped by the optimizer.
        self.idf = nn.Parameter(torch.zeros(self.n_features), requires_grad=False)
        self.weight = nn.Parameter(torch.zeros(self.n_features, n_labels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_labels), requires_grad=False)

    @property
    def fitted(self) -> bool:
        return bool(self.idf.detach().abs().sum() > 0)

    def analyze(self, text: Optional[str]) -> list[str]:
        """The n-grams of `text` the branch reads (a missing text has none)."""
        return ngrams_of(text, self.ngrams) if isinstance(text, str) else []

    # ------------------------------------------------------------------------------------------- features
    def row_counts(self, text: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
        """One text's hashed n-gram counts: (sorted column ids int64, counts float32)."""
        ids = np.fromiter((hashed_id(g, self.n_features) for g in self.analyze(text)), dtype=np.int64)
        ids, counts = np.unique(ids, return_counts=True)
        return ids, counts.astype(np.float32)

    def row_tfidf(self, ids: np.ndarray, counts: np.ndarray, idf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts → the L2-normalised sublinear TF-IDF of one row (scikit-learn's TfidfTransformer with
        sublinear_tf=True, smooth_idf=True, norm="l2"); n-grams whose idf is 0 — seen in fewer than min_df
        training texts — are dropped."""
        values = (1.0 + np.log(counts)) * idf[ids]
        keep = values != 0
        return ids[keep], l2_normalized(values[keep])

    def featurize(self, texts: Sequence[Optional[str]], length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Texts → ``lexical_ids`` (N, T) long and ``lexical_values`` (N, T) float: each row's non-zero TF-IDF
        entries, padded with (0, 0.0), which add nothing. ``length``: pad to at least T (a whole split at once)."""
        idf = self.idf.detach().cpu().numpy()
        rows = [self.row_tfidf(*self.row_counts(t), idf) for t in texts]
        t = max(max((len(r[0]) for r in rows), default=0), int(length or 0), 1)
        ids = np.zeros((len(rows), t), dtype=np.int64)
        values = np.zeros((len(rows), t), dtype=np.float32)
        for i, (row_ids, row_values) in enumerate(rows):
            ids[i, : len(row_ids)], values[i, : len(row_ids)] = row_ids, row_values
        return {"lexical_ids": torch.from_numpy(ids), "lexical_values": torch.from_numpy(values)}

    def forward(self, lexical_ids: torch.Tensor, lexical_values: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        out = F.embedding_bag(lexical_ids.to(weight.device), weight, per_sample_weights=lexical_values.to(weight),
                              mode="sum")
        return out + self.bias

    # ------------------------------------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(self, texts: Sequence[Optional[str]], targets: np.ndarray, c: float = 4.0) -> dict:
        """Fit idf on `texts` and one logistic regression per genre on multi-hot `targets` (N, L); returns a short
        summary. Rows without text take part in neither."""
        targets = np.asarray(targets)
        if targets.ndim != 2 or targets.shape != (len(texts), self.weight.shape[1]):
            raise ValueError(f"lexical fit: targets must be (N={len(texts)}, L={self.weight.shape[1]}) multi-hot, "
                             f"got {targets.shape}")
        present = np.array([isinstance(t, str) and bool(t.strip()) for t in texts])
        if not present.any():
            raise ValueError("lexical fit: no training row has a text; turn the branch off (model.lexical=false)")
        counts = [self.row_counts(t) for t, p in zip(texts, present) if p]
        y = targets[present] > 0
        n = len(counts)
        df = np.bincount(np.concatenate([ids for ids, _ in counts]), minlength=self.n_features)
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        idf[df < self.min_df] = 0.0
        x = self._design_matrix([self.row_tfidf(ids, c, idf) for ids, c in counts])
        from sklearn.linear_model import LogisticRegression  # training only: predicting needs no scikit-learn

        weight = np.zeros(self.weight.shape, dtype=np.float32)
        bias = np.zeros(self.bias.shape, dtype=np.float32)
        constant = []
        for j in range(y.shape[1]):
            positives = int(y[:, j].sum())
            if positives in (0, n):
                bias[j] = _CONSTANT_LOGIT if positives else -_CONSTANT_LOGIT
                constant.append(j)
                continue
            clf = LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x, y[:, j])
            weight[:, j] = clf.coef_[0]
            bias[j] = clf.intercept_[0]
        self.idf.copy_(torch.from_numpy(idf))
        self.weight.copy_(torch.from_numpy(weight))
        self.bias.copy_(torch.from_numpy(bias))
        return {"rows": int(n), "ngrams_kept": int((idf > 0).sum()), "constant_genres": constant}

    def _design_matrix(self, rows: list[tuple[np.ndarray, np.ndarray]]):
        """The TF-IDF rows as one SciPy CSR matrix (N, n_features), the input of the logistic regressions."""
        from scipy import sparse  # training only, as scikit-learn

        indptr = np.cumsum([0] + [len(ids) for ids, _ in rows])
        indices = np.concatenate([ids for ids, _ in rows]).astype(np.int32)
        data = np.concatenate([values for _, values in rows]).astype(np.float32)
        return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), self.n_features))


__all__ = ["LexicalBranch"]
