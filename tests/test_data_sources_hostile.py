"""One hostile row never stops a reader (issue 18): a JSONL line nested 100,000 deep, a CSV field of 20 MB, a plot
over the 10,000-character cap, an id of 5,000 digits. Each becomes that row's report (by id when the line starts
with it, always by line), every other row is read, and an over-long line is read past, never held whole."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from data_helpers import balanced_rows, write_jsonl_source
from mmgcs.data import sources
from mmgcs.data.build import BuildOptions, build
from mmgcs.data.records import MAX_PLOT_CHARS, MAX_ROW_BYTES, BuildReport

DEEP = "[" * 100_000 + "]" * 100_000


def _read(reader, path: Path) -> tuple[list, BuildReport]:
    report = BuildReport()
    return [m.id for m in reader(path, "s", report)], report


def _dropped(report: BuildReport) -> dict:
    return {e["where"]: e for e in report.events if e["action"] == "dropped"}


def test_a_deeply_nested_jsonl_line_is_that_rows_error(tmp_path):
    path = tmp_path / "movies.jsonl"
    path.write_text("\n".join([json.dumps({"id": 1, "plot": "fine"}), '{"id": 2, "plot": ' + DEEP + "}",
                               '{"plot": ' + DEEP + ', "id": 3}', json.dumps({"id": 4, "plot": "fine too"})]) + "\n")
    ids, report = _read(sources.read_jsonl, path)
    assert ids == [1, 4]
    deep = _dropped(report)
    assert deep["movies.jsonl:2"]["id"] == 2 and "nests too deeply" in deep["movies.jsonl:2"]["detail"]
    assert deep["movies.jsonl:3"]["id"] is None and "line 3" in deep["movies.jsonl:3"]["detail"]  # id after the plot


def test_nesting_in_fields_and_ids_is_reported_not_raised(tmp_path):
    path = tmp_path / "movies.jsonl"
    nested = "[" * 500 + "]" * 500  # within json's limit
    path.write_text("\n".join([
        '{"id": ' + nested + ', "plot": "x"}',
        json.dumps({"id": 5, "plot": "x", "genres": "[" * 100_000}),  # genres text that json cannot parse
        '{"id": 1' + "0" * 5000 + ', "plot": "x"}',  # Python refuses to convert a 5,001-digit integer
        json.dumps({"id": "9" * 5000, "plot": "x"}),
        json.dumps({"id": 6, "plot": "x"}),
    ]) + "\n")
    ids, report = _read(sources.read_jsonl, path)
    assert ids == [5, 6]
    dropped = _dropped(report)
    assert dropped["movies.jsonl:1"]["id"] is None and "of type list" in dropped["movies.jsonl:1"]["detail"]
    assert "cannot be read as JSON" in dropped["movies.jsonl:3"]["detail"]
    assert len(str(dropped["movies.jsonl:4"]["id"])) < 120  # an id is shown cut, never whole
    genres = next(e for e in report.events if e["id"] == 5)
    assert genres["reason"] == "bad_genres_field" and "nests too deeply" in genres["detail"]


def _peak_while(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_over_long_jsonl_line_is_read_past_in_bounded_memory(tmp_path):
    path = tmp_path / "movies.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": 1, "plot": "fine"}) + "\n")
        f.write('{"id": 2, "plot": "' + "x" * (20 * 2**20) + '"}\n')  # a 20 MB plot
        f.write(json.dumps({"id": 3, "plot": "fine"}) + "\n")
    (ids, report), peak = _peak_while(lambda: _read(sources.read_jsonl, path))
    assert ids == [1, 3]
    event = _dropped(report)["movies.jsonl:2"]
    assert event["id"] == 2 and event["reason"] == "row_too_long"
    assert "20.0 MB long, over the 1.0 MB limit" in event["detail"] and f"{MAX_PLOT_CHARS:,} characters" in event["detail"]
    assert peak < 4 * MAX_ROW_BYTES, peak  # never the 20 MB line


def test_a_csv_with_a_20_mb_field_reads_every_other_row(tmp_path):
    path = tmp_path / "movies.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("id,title,plot,genres\n1,A,short plot,Drama\n")
        f.write("2,B," + "x" * (20 * 2**20) + ",Drama\n")  # on one line
        f.write('3,C,"a quoted plot\n' + ("y" * 1000 + "\n") * 1500 + '",Drama\n')  # over many lines: 1.5 MB
        f.write("4,D,another plot,Drama\n")
    (ids, report), peak = _peak_while(lambda: _read(sources.read_csv, path))
    assert ids == [1, 4]
    dropped = _dropped(report)
    assert list(dropped) == ["movies.csv:3", "movies.csv:4"]  # where each row starts
    assert dropped["movies.csv:3"]["id"] == 2 and "line 3 is 20.0 MB long" in dropped["movies.csv:3"]["detail"]
    quoted = dropped["movies.csv:4"]["detail"]
    # the quoted field is read past to its end, so row 4 after it is read, not taken for part of it
    assert "field over the 1.0 MB limit" in quoted and quoted.endswith("lines 4-1505 were read past")
    assert peak < 8 * MAX_ROW_BYTES, peak


def test_the_lines_after_an_over_long_csv_line_keep_their_numbers(tmp_path):
    path = tmp_path / "movies.csv"
    path.write_text("id,plot\n1,a\n2," + "x" * (MAX_ROW_BYTES + 5) + "\n3,b\nx,c\n", encoding="utf-8")
    ids, report = _read(sources.read_csv, path)
    assert ids == [1, 3]
    assert [(e["where"], e["reason"]) for e in report.events] == [("movies.csv:3", "row_too_long"),
                                                                  ("movies.csv:5", "bad_id")]


def test_an_over_long_csv_header_names_the_problem(tmp_path):
    path = tmp_path / "movies.csv"
    path.write_text("id,plot," + "h" * (MAX_ROW_BYTES + 1) + "\n1,a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"the header cannot be read \(line 1 is 1.0 MB long\)"):
        _read(sources.read_csv, path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_plot_over_the_cap_is_that_rows_error_and_one_at_the_cap_is_read(tmp_path, fmt):
    plots = {1: "p" * MAX_PLOT_CHARS, 2: "q" * (MAX_PLOT_CHARS + 1), 3: " " * 50 + "r" * MAX_PLOT_CHARS + "\n"}
    if fmt == "jsonl":
        path = tmp_path / "movies.jsonl"
        path.write_text("".join(json.dumps({"id": i, "plot": p}) + "\n" for i, p in plots.items()))
        ids, report = _read(sources.read_jsonl, path)
    else:
        path = tmp_path / "movies.csv"
        path.write_text("id,plot\n" + "".join(f'{i},"{p}"\n' for i, p in plots.items()))
        ids, report = _read(sources.read_csv, path)
    assert ids == [1, 3]  # the cap counts the plot as the Space does, without the whitespace around it
    (event,) = report.events
    assert event["id"] == 2 and event["reason"] == "plot_too_long" and event["action"] == "dropped"
    assert event["detail"].startswith("the plot is 10,001 characters long; the limit is 10,000")


def test_mmimdb_passes_over_an_over_long_summary_and_drops_a_movie_with_only_those(tmp_path):
    root = tmp_path / "mmimdb"
    (root / "dataset").mkdir(parents=True)
    long_plot, short_plot = "l" * (MAX_PLOT_CHARS + 1), "a short summary"
    (root / "dataset" / "0000001.json").write_text(json.dumps({"plot": [long_plot, short_plot], "genres": ["Drama"]}))
    (root / "dataset" / "0000002.json").write_text(json.dumps({"plot": [long_plot], "genres": ["Drama"]}))
    (root / "dataset" / "0000003.json").write_text('{"plot": ' + DEEP + "}")
    (root / "dataset" / "0000004.json").write_text(json.dumps({"plot": ["fine"], "genres": ["Drama"]}))
    report = BuildReport()
    movies = list(sources.read_mmimdb(root, "m", report))
    assert [(m.id, m.plot) for m in movies] == [(1, short_plot), (4, "fine")]
    by_id = {e["id"]: e for e in report.events}
    assert by_id[1]["action"] == "changed" and "1 of its 2 plot summaries passed over" in by_id[1]["detail"]
    assert by_id[2]["action"] == "dropped" and by_id[2]["reason"] == "plot_too_long"
    assert by_id["0000003"]["action"] == "dropped" and "nests too deeply" in by_id["0000003"]["detail"]


def test_data_build_reports_each_hostile_row_and_builds_the_others(tmp_path):
    rows, posters = balanced_rows(30)
    raw = [b'{"id": 90, "plot": ' + DEEP.encode() + b"}",
           json.dumps({"id": 91, "plot": "x" * (MAX_PLOT_CHARS + 1), "genres": ["Drama"]}).encode(),
           b'{"id": 92, "plot": "' + b"y" * (MAX_ROW_BYTES + 10) + b'"}']
    src = write_jsonl_source(tmp_path / "src", rows, posters, raw_lines=raw)
    result = build(BuildOptions(sources=[str(src)], out=str(tmp_path / "out"), min_genre_count=3, progress=False))
    assert result.report["totals"]["kept"] == 30
    dropped = {e["id"]: e["reason"] for e in result.report["events"] if e["action"] == "dropped"}
    assert dropped == {90: "malformed_line", 91: "plot_too_long", 92: "row_too_long"}


def test_data_build_checks_out_before_reading_anything(tmp_path, capsys):
    from mmgcs.data.__main__ import main

    src = write_jsonl_source(tmp_path / "src", *balanced_rows(10))
    (tmp_path / "file").write_text("x")
    for out, expected in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "ds", "is a file")):
        assert main(["build", "--source", str(src), "--out", str(out), "--no-progress", "--min-genre-count", "1"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
