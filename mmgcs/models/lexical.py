"""The lexical branch: a TF-IDF logistic regression over the words and word pairs of the text, added to the fused
logits (``logits = fusion + lexical_weight * lexical``, where the text is present).

Why: a frozen sentence encoder summarises a plot in one vector and loses the telling words ("murder", "alien",
"musical"); a linear model over n-grams keeps them. On the shared TMDB data the two are complementary: averaging
them beat either alone by ~0.03 test micro-F1 (see the closing notes of issue #4 and configs/fusion.yaml).

Design choices:
- Hashed n-grams (scikit-learn's ``HashingVectorizer``, murmurhash3) instead of a vocabulary: the branch is then
  tensors only (idf, weights, bias), saved in ``model.safetensors`` with everything else and restored by
  ``save_state``/``--resume`` and ``from_pretrained`` without any extra file, pickle or JSON vocabulary.
- Fitted in closed form before the head trains (one L2-regularised logistic regression per genre, scikit-learn
  ``liblinear``), never by gradient: its parameters do not require grad, so the optimizer and DDP leave them alone
  and DDP's start-up broadcast copies the main process's fit to every rank.
- The fused head is trained on its own loss; ``lexical_weight`` is tuned afterwards on the validation split (the
  engine's ``_tune_lexical_weight``), like the decision thresholds.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize
from torch import nn

# A genre with no positive (or no negative) training example cannot be fitted; its logit is then a constant far
# on that side.
_CONSTANT_LOGIT = 10.0


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
        self._vectorizer = None

    @property
    def fitted(self) -> bool:
        return bool(self.idf.detach().abs().sum() > 0)

    def vectorizer(self):
        if self._vectorizer is None:
            self._vectorizer = HashingVectorizer(
                n_features=self.n_features, ngram_range=(1, self.ngrams), alternate_sign=False, norm=None,
                lowercase=True, dtype=np.float32,
            )
        return self._vectorizer

    # ------------------------------------------------------------------------------------------- features
    def counts(self, texts: Sequence[Optional[str]]):
        """Raw n-gram counts, a scipy CSR matrix (N, n_features); a missing text is an empty row."""
        return self.vectorizer().transform([t if isinstance(t, str) else "" for t in texts])

    def tfidf(self, counts, idf: Optional[np.ndarray] = None):
        """Counts → L2-normalised sublinear TF-IDF rows (the same formula as scikit-learn's TfidfTransformer with
        sublinear_tf=True, smooth_idf=True, norm="l2"; n-grams whose idf is 0 — seen in fewer than min_df training
        texts — are dropped)."""
        idf = self.idf.detach().cpu().numpy() if idf is None else idf
        x = counts.tocsr(copy=True).astype(np.float32)
        x.data = (1.0 + np.log(x.data)) * idf[x.indices]
        x.eliminate_zeros()
        return normalize(x, norm="l2", copy=False)

    def featurize(self, texts: Sequence[Optional[str]], length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Texts → ``lexical_ids`` (N, T) long and ``lexical_values`` (N, T) float: each row's non-zero TF-IDF
        entries, padded with (0, 0.0), which add nothing. ``length``: pad to at least T (a whole split at once)."""
        x = self.tfidf(self.counts(texts))
        nnz = np.diff(x.indptr)
        t = max(int(nnz.max()) if len(nnz) else 0, int(length or 0), 1)
        ids = np.zeros((x.shape[0], t), dtype=np.int64)
        values = np.zeros((x.shape[0], t), dtype=np.float32)
        for i in range(x.shape[0]):
            start, end = x.indptr[i], x.indptr[i + 1]
            ids[i, : end - start] = x.indices[start:end]
            values[i, : end - start] = x.data[start:end]
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
        counts = self.counts([t for t, p in zip(texts, present) if p])
        y = targets[present] > 0
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=self.n_features)
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        idf[df < self.min_df] = 0.0
        x = self.tfidf(counts, idf)
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


__all__ = ["LexicalBranch"]
