"""mmgcs/data/lines.py: a source's lines read boundedly. Short lines come as the whole-file reader gives them; an
over-long one comes as its head and length (JSONL) or as LineTooLong in its place (CSV), read past in chunks that
are never larger than the limit or CHUNK."""

import csv
import io

import pytest

from mmgcs.data import lines as L
from mmgcs.data.lines import BoundedTextLines, LineTooLong, LongLine, bounded_lines, size_text


class _Spy(io.BytesIO):
    """A file that records the size of every read it answers."""

    def __init__(self, data):
        super().__init__(data)
        self.sizes = []

    def readline(self, size=-1):
        line = super().readline(size)
        self.sizes.append(len(line))
        return line


def test_size_text():
    assert size_text(512) == "512 bytes" and size_text(12_345) == "12,345 bytes"
    assert size_text(3 * 2**20 + 2**19) == "3.5 MB"


@pytest.mark.parametrize("last_newline", [True, False])
def test_bounded_lines_keeps_short_lines_and_reports_a_long_one_by_head_and_length(monkeypatch, last_newline):
    monkeypatch.setattr(L, "HEAD_CHARS", 8)
    monkeypatch.setattr(L, "CHUNK", 16)  # the long line is read past in many small reads
    long = b'{"id": 7, "plot": "' + b"x" * 200 + b'"}' + (b"\n" if last_newline else b"")
    data = b'{"id": 1}\n' + b"0123456789\n" + long
    f = _Spy(data)
    got = list(bounded_lines(f, limit=10))
    assert got[:2] == [b'{"id": 1}\n', b"0123456789\n"]  # exactly the limit besides its newline: kept
    assert got[2] == LongLine(head=long[:8], size=len(long))
    assert len(got) == 3
    assert max(f.sizes) <= 16  # never more than max(limit + 1, CHUNK) held at once


def test_text_lines_are_those_of_the_whole_file_reader():
    text = 'id,plot\n1,"a plot\nover two lines"\r\n2,form\x0cfeed\n3,last'
    lines = BoundedTextLines(io.StringIO(text), limit=100)
    assert list(lines) == text.splitlines(keepends=True)
    assert lines.line == len(text.splitlines())
    whole = csv.reader(text.splitlines(keepends=True))  # the whole-file reader the sources used before
    assert list(csv.reader(BoundedTextLines(io.StringIO(text), 100))) == list(whole)
    assert list(BoundedTextLines(text.splitlines(keepends=True), 100)) == text.splitlines(keepends=True)


def test_an_over_long_line_is_raised_in_its_place_and_its_record_skipped(monkeypatch):
    monkeypatch.setattr(L, "CHUNK", 8)
    good = ['id,plot\n', '1,short\n']
    dropped = ['2,"starts a quoted field\n', "y" * 50 + "\n", 'and ends it"\n']
    after = ['3,kept\n', '4,"also\nkept"\n']
    text = "".join(good + dropped + after)
    lines = BoundedTextLines(io.StringIO(text), limit=30)
    reader = csv.reader(lines)
    rows = [next(reader), next(reader)]
    lines.mark()
    with pytest.raises(LineTooLong) as raised:
        next(reader)
    assert raised.value.lineno == 4 and raised.value.line.size == 51 and "line 4 is 51 bytes long" in str(raised.value)
    assert lines.record_start == 3  # the record began on the line before
    lines.skip_record()
    rows += list(csv.reader(lines))  # a fresh reader after the dropped record, as the CSV source does
    assert rows == [["id", "plot"], ["1", "short"], ["3", "kept"], ["4", "also\nkept"]]
    assert lines.line == text.count("\n")  # every file line counted, given or read past
