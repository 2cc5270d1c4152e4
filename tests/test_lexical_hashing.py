"""The lexical branch's n-grams, ids and TF-IDF values are scikit-learn's, bit for bit, though predicting no longer
imports scikit-learn (mmgcs.models.lexical): the reference below is the pipeline the branch ran before, built from
HashingVectorizer, and the test fails on any id, count or last-digit difference."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from mmgcs.models import lexical
from mmgcs.models.lexical import LexicalBranch

sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
from sklearn.preprocessing import normalize  # noqa: E402

WORDS = ["ghost", "Ghost", "GHOST", "wedding", "naïve", "café", "Straße", "İstanbul", "ǅemal", "東京", "killer's",
         "self-made", "x", "a", "42", "3.14", "don't", "ﬁnal", "ÉCOLE", "über", "Ωmega", "co_op", "🎬", "—", "l'été"]


def texts(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = ["", "   ", "a b c", "the the the the", None, "Ghost ghost GHOST gHoSt", "one\ntwo\tthree  four"]
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 120))]
        out.append(rng.choice([" ", "  ", ", ", ". ", "\n"]).join(words))
    return out


def reference_counts(branch: LexicalBranch, docs: list):
    vectorizer = sklearn_text.HashingVectorizer(n_features=branch.n_features, ngram_range=(1, branch.ngrams),
                                                alternate_sign=False, norm=None, lowercase=True, dtype=np.float32)
    return vectorizer.transform([d if isinstance(d, str) else "" for d in docs])


def reference_tfidf(counts, idf: np.ndarray):
    x = counts.tocsr(copy=True).astype(np.float32)
    x.data = (1.0 + np.log(x.data)) * idf[x.indices]
    x.eliminate_zeros()
    return normalize(x, norm="l2", copy=False)


@pytest.mark.parametrize("n_features,ngrams", [(2**18, 2), (1000, 3), (7, 1)])
def test_ids_and_counts_equal_hashing_vectorizers(n_features, ngrams):
    branch, docs = LexicalBranch(n_features, 3, ngrams=ngrams), texts(300)
    expected = reference_counts(branch, docs)
    for i, doc in enumerate(docs):
        ids, counts = branch.row_counts(doc)
        row = expected[i]
        assert np.array_equal(ids, row.indices) and np.array_equal(counts, row.data), (i, doc)
        if isinstance(doc, str):
            analyzer = sklearn_text.HashingVectorizer(ngram_range=(1, ngrams)).build_analyzer()
            assert branch.analyze(doc) == analyzer(doc)


def test_fitted_idf_and_features_equal_the_scikit_learn_pipeline():
    rng = np.random.default_rng(0)
    docs = texts(400, seed=1)
    targets = rng.integers(0, 2, size=(len(docs), 3))
    branch = LexicalBranch(2**12, 3, ngrams=2, min_df=2)
    branch.fit(docs, targets, c=4.0)
    present = [d for d in docs if isinstance(d, str) and d.strip()]
    counts = reference_counts(branch, present)
    df = np.bincount(counts.indices, minlength=branch.n_features)
    idf = (np.log((1.0 + len(present)) / (1.0 + df)) + 1.0).astype(np.float32)
    idf[df < branch.min_df] = 0.0
    assert np.array_equal(branch.idf.numpy(), idf)
    expected = reference_tfidf(reference_counts(branch, docs), idf)
    features = branch.featurize(docs)
    for i in range(len(docs)):
        row, n = expected[i], expected[i].nnz
        assert np.array_equal(features["lexical_ids"][i, :n].numpy(), row.indices), i
        assert np.array_equal(features["lexical_values"][i, :n].numpy(), row.data), i  # every digit
        assert not features["lexical_values"][i, n:].any()


def test_the_int32_minimum_hash_follows_scikit_learns_rule(monkeypatch):
    # abs(-2**31) does not fit in 32 bits; scikit-learn maps it to (2**31 - 1 - (n - 1)) % n, i.e. 2**31 % n
    monkeypatch.setattr(lexical.mmh3, "hash", lambda key, seed, signed: -(2**31))
    assert [lexical.hashed_id("any", n) for n in (7, 1000, 2**18)] == [2**31 % n for n in (7, 1000, 2**18)]


def test_predicting_does_not_import_scikit_learn(tmp_path):
    # (SciPy still comes: transformers' model code imports scipy.optimize when it is installed.)
    from mmgcs.testing import tiny_model

    model = tiny_model(["Action", "Drama"], image=False, lexical=True)
    model.lexical.fit(["a killer in the city", "a family drama at home"], np.array([[1, 0], [0, 1]]), c=1.0)
    model.save_pretrained(tmp_path / "model")
    code = (  # what a server does: load the bundle, predict and explain a plot through the lexical branch
        "import sys; import mmgcs.serving; from mmgcs.models.classifier import GenreClassifier\n"
        "from mmgcs.inference import Predictor\n"
        f"model = GenreClassifier.from_pretrained({str(tmp_path / 'model')!r})\n"
        "out = Predictor(model).predict('A killer stalks the city at night.', explain=True)\n"
        "assert out['explanation']['genres'], out\n"
        "print(sorted(m for m in ('sklearn',) if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.stdout.strip().splitlines()[-1:] == ["[]"], run.stderr[-3000:]
