"""mmgcs/data/splits.py: the split ratios option and the iterative-stratification assignment of movies to splits."""

import numpy as np
import pytest

from mmgcs.data.splits import SPLITS, parse_ratios, stratified_split


def test_parse_ratios_normalizes_to_one():
    assert parse_ratios("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_ratios("8, 1, 1") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_ratios("1,1,2") == pytest.approx((0.25, 0.25, 0.5))


@pytest.mark.parametrize("text", ["0.8,0.2", "0.8,0.2,0", "a,b,c", "0.8,-0.1,0.3", ""])
def test_parse_ratios_rejects_what_leaves_a_split_empty_or_is_not_numbers(text):
    with pytest.raises(ValueError, match="three positive numbers"):
        parse_ratios(text)


@pytest.fixture
def movies():
    rng = np.random.default_rng(5)
    ids = [int(i) for i in rng.permutation(np.arange(1000, 1300))]
    labels = (rng.random((300, 4)) < [0.5, 0.3, 0.1, 0.05]).astype(int)
    return ids, labels


def test_every_movie_gets_one_split_at_the_ratios_for_every_genre(movies):
    ids, labels = movies
    got = stratified_split(ids, labels, (0.8, 0.1, 0.1), seed=42)
    assert set(got) == set(ids) and set(got.values()) == set(SPLITS)
    names = np.array([got[i] for i in ids])
    for split, ratio in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs((names == split).sum() - ratio * len(ids)) <= 3, split
        for j in range(labels.shape[1]):  # stratified: each genre's movies shared out at the same ratios
            positives = labels[:, j].sum()
            assert abs(labels[names == split, j].sum() - ratio * positives) <= 2, (split, j)


def test_the_same_movies_and_seed_give_the_same_splits_in_any_order(movies):
    ids, labels = movies
    first = stratified_split(ids, labels, seed=7)
    reverse = stratified_split(ids[::-1], labels[::-1], seed=7)
    assert first == reverse
    assert stratified_split(ids, labels, seed=8) != first  # the seed is the only randomness


def test_a_handful_of_movies_leaves_no_split_empty():
    labels = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    got = stratified_split([3, 1, 4, 2], labels, (0.8, 0.1, 0.1), seed=0)
    assert set(got.values()) == set(SPLITS)


def test_no_movies_and_repeated_ids():
    assert stratified_split([], np.zeros((0, 3))) == {}
    with pytest.raises(ValueError, match="distinct ids"):
        stratified_split([1, 1, 2], np.zeros((3, 2)))
