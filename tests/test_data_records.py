"""mmgcs/data/records.py: the plot cap every entry point shares (counted without surrounding whitespace), a row's id
as a report may hold it (scalars kept, long text cut, nested content never), and the build report's events and
counts. Readers meeting hostile rows: tests/test_data_sources_hostile.py."""

from __future__ import annotations

from collections import Counter

from mmgcs.data.records import (
    MAX_PLOT_CHARS,
    MAX_REPORTED_ID_CHARS,
    BuildReport,
    RawMovie,
    plot_too_long,
    reportable_id,
)


def test_a_plot_over_the_cap_is_named_with_its_length_and_the_limit():
    assert plot_too_long("x" * MAX_PLOT_CHARS) is None
    assert plot_too_long("  " + "x" * MAX_PLOT_CHARS + "\n\n") is None  # whitespace around it does not count
    message = plot_too_long("x" * (MAX_PLOT_CHARS + 1))
    assert message.startswith("the plot is 10,001 characters long; the limit is 10,000.") and "summary" in message
    assert plot_too_long(None) is None and plot_too_long(12345) is None  # not text: another check's business


def test_an_id_is_reported_as_a_scalar_or_cut_text_never_as_nested_content():
    assert [reportable_id(v) for v in (None, 7, 2.5, True, "tt0111161")] == [None, 7, 2.5, True, "tt0111161"]
    long_id = "9" * 5000
    assert reportable_id(long_id) == "9" * MAX_REPORTED_ID_CHARS + "…"
    assert reportable_id([1, [2, [3]]]) is None and reportable_id({"id": 1}) is None


def test_the_build_report_records_each_event_and_counts_reasons():
    report = BuildReport()
    report.dropped("tmdb5000", 12, "no_genres", "no genre names", where="movies.jsonl:3")
    report.dropped("tmdb5000", "x" * 500, "plot_too_long", "10,001 characters")
    report.changed("mmimdb", [["nested"]], "genre_renamed", "'sci fi' written as 'Sci-Fi'")
    assert report.events[0] == {"action": "dropped", "source": "tmdb5000", "id": 12, "reason": "no_genres",
                                "detail": "no genre names", "where": "movies.jsonl:3"}
    assert "where" not in report.events[1] and len(report.events[1]["id"]) == MAX_REPORTED_ID_CHARS + 1
    assert report.events[2]["id"] is None and report.events[2]["action"] == "changed"
    assert report.reason_counts("dropped") == Counter({"no_genres": 1, "plot_too_long": 1})
    assert report.reason_counts("changed") == Counter({"genre_renamed": 1})
    report.count("tmdb5000", "read", 3)
    report.count("tmdb5000", "read")
    report.count("mmimdb", "kept")
    assert report.sources == {"tmdb5000": Counter({"read": 4}), "mmimdb": Counter({"kept": 1})}


def test_a_raw_movie_holds_only_what_its_source_had():
    movie = RawMovie(source="tmdb5000", where="movies.jsonl:1", id=1)
    other = RawMovie(source="tmdb5000", where="movies.jsonl:2", id=2)
    movie.genres.append("Drama")
    assert other.genres == [] and (movie.plot, movie.poster_file, movie.split) == (None, None, None)
