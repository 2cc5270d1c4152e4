"""mmgcs/data/genres.py: genre names read from every way a source writes them, variants of a known genre mapped to
it, a misspelling reported with the closest known genre, `--rename-genre` values parsed, and the label set chosen
(explicit, or by a minimum count) with the genres left out."""

from __future__ import annotations

from collections import Counter

import pytest

from mmgcs.data.genres import (
    IMDB_GENRES,
    KNOWN_GENRES,
    TMDB_GENRES,
    canonical_genre,
    genre_key,
    parse_genres,
    parse_renames,
    select_labels,
)


@pytest.mark.parametrize("value", [
    ["Drama", "Science  Fiction"],
    '[{"id": 18, "name": "Drama"}, {"id": 878, "name": "Science Fiction"}]',  # TMDb's JSON
    "[{'id': 18, 'name': 'Drama'}, {'id': 878, 'name': 'Science Fiction'}]",  # a Python repr of it
    '["Drama", "Science Fiction"]',
    "Drama|Science Fiction",
    "Drama; Science Fiction",
    " Drama , Science Fiction ",
])
def test_every_spelling_of_a_list_gives_the_same_names(value):
    assert parse_genres(value) == (["Drama", "Science Fiction"], None)


def test_empty_and_unreadable_fields():
    assert parse_genres(None) == ([], None) and parse_genres("   ") == ([], None)
    assert parse_genres({"id": 35, "name": "Comedy"}) == (["Comedy"], None)  # one dict: a list of one
    names, problem = parse_genres("[Drama, ")
    assert names == [] and "neither a list nor a separated string" in problem
    names, problem = parse_genres(42)
    assert names == [] and "type int" in problem
    names, problem = parse_genres(["Drama", 7, "", {"id": 1}])
    assert names == ["Drama"] and "not names" in problem and "7" in problem


def test_known_genres_are_both_vocabularies():
    assert set(KNOWN_GENRES) == set(TMDB_GENRES) | set(IMDB_GENRES) and list(KNOWN_GENRES) == sorted(KNOWN_GENRES)


def test_variants_of_a_known_genre_map_to_it_and_a_misspelling_is_reported():
    assert genre_key("Sci_Fi") == genre_key("sci-fi") == genre_key("SciFi") == "scifi"
    assert canonical_genre("Drama") == ("Drama", None)
    assert canonical_genre("sci fi") == ("Sci-Fi", "genre 'sci fi' written as 'Sci-Fi'")
    name, note = canonical_genre("Comdy")
    assert name == "Comdy" and "unknown genre 'Comdy'" in note and "did you mean 'Comedy'" in note
    assert "--rename-genre 'Comdy=Comedy'" in note
    name, note = canonical_genre("Zzzzz")
    assert name == "Zzzzz" and note == "unknown genre 'Zzzzz'"  # nothing close: no guess


def test_renames_are_parsed_and_a_malformed_one_names_the_form():
    assert parse_renames(["Comdy=Comedy", " Sci-Fi = Science Fiction "]) == {
        "Comdy": "Comedy", "Sci-Fi": "Science Fiction"}
    for bad in ("Comedy", "=Comedy", "Comdy=", "  =  "):
        with pytest.raises(ValueError, match=r"must look like OLD=NEW \(e\.g\. 'Comdy=Comedy'\)"):
            parse_renames([bad])


def test_labels_by_count_are_sorted_and_the_rest_reported():
    counts = Counter({"Drama": 9, "Action": 5, "Western": 1, "Comedy": 5})
    assert select_labels(counts, 5) == (["Action", "Comedy", "Drama"], {"Western": 1})
    with pytest.raises(ValueError, match=r"No genre has at least 10 movies .*Drama \(9\).*--min-genre-count"):
        select_labels(counts, 10)


def test_explicit_labels_keep_their_order_and_must_exist():
    counts = Counter({"Drama": 9, "Action": 5, "Western": 1})
    assert select_labels(counts, 100, ["Western", "Drama", "Western"]) == (["Western", "Drama"], {"Action": 5})
    with pytest.raises(ValueError, match=r"--genres names \['Horror'\] but no movie has them.*Drama \(9\)"):
        select_labels(counts, 1, ["Drama", "Horror"])
