"""A source file's lines, read boundedly: a line over the limit is read past in chunks, never held whole.

One hostile row must neither exhaust memory nor stop a reader (a 147 MB "plot" once took the tokenizer to 7.5 GB):
the JSONL reader gets such a line as a `LongLine` (its first bytes, for the id, and its length), the CSV reader
gets `LineTooLong` raised in its place and then reads past the rest of the record it was in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

# What is kept of an over-long line: enough to find an id at its start.
HEAD_CHARS = 4096
# The chunks an over-long line is read past in.
CHUNK = 1 << 20
_LINE_ENDS = ("\n", "\r")


@dataclass(frozen=True)
class LongLine:
    """A line over the reader's limit: its first bytes or characters (for the id) and its length."""

    head: bytes | str
    size: int


def size_text(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def bounded_lines(f, limit: int) -> Iterator[bytes | LongLine]:
    """The lines of a binary file, each at most `limit` bytes besides its newline; a longer one comes as a
    `LongLine`, read past in chunks."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        head, size = line[:HEAD_CHARS], len(line)
        while not line.endswith(b"\n") and (line := f.readline(CHUNK)):
            size += len(line)
        yield LongLine(head, size)


class LineTooLong(ValueError):
    """Raised by `BoundedTextLines` in place of a line over its limit."""

    def __init__(self, line: LongLine, lineno: int):
        super().__init__(f"line {lineno} is {size_text(line.size)} long")
        self.line, self.lineno = line, lineno


class BoundedTextLines:
    """The lines of a text file (or of an iterable of lines) for the csv module, as `str.splitlines(keepends=True)`
    gives them (it also ends a line at \\v, \\f, U+2028 … outside quotes, which the file's own lines do not), so
    rows and line numbers stay those of the whole-file reader; each is at most `limit` characters.

    A longer physical line is read past and raises `LineTooLong` in its place: the csv reader drops the record it
    was in. The caller then calls `skip_record`, which reads past the rest of that record (the lines of a quoted
    field still open, known by the count of quote characters since the record began), and `mark` after each
    record read. The same recovery serves a record the csv reader refuses itself (a field over its limit).
    """

    def __init__(self, f, limit: int):
        self._readline = f.readline if hasattr(f, "readline") else (lambda _n, lines=iter(f): next(lines, ""))
        self.limit = limit
        self.pending: deque[str] = deque()
        self.given = 0  # lines handed to the csv reader: its line_num
        self.passed = 0  # lines read past instead (over-long, or the rest of a dropped record)
        self.quotes = 0  # quote characters in the record being read
        self.record_start = 1  # the file line it starts on
        self._fresh = True

    @property
    def line(self) -> int:
        """The file line number of the last line read."""
        return self.given + self.passed

    def __iter__(self) -> "BoundedTextLines":
        return self

    def __next__(self) -> str:
        while not self.pending:
            line = self._readline(self.limit + 1)
            if not line:
                raise StopIteration
            if len(line) > self.limit and not line.endswith(_LINE_ENDS):
                raise self._read_past(line)
            self.pending.extend(line.splitlines(keepends=True))
        line = self.pending.popleft()
        self.given += 1
        self._count(line)
        return line

    def mark(self) -> None:
        """A record ended with the last line read: the next one starts after it."""
        self.quotes, self._fresh = 0, True

    def skip_record(self) -> None:
        """Read past the rest of a record the csv reader dropped: while its quotes leave a quoted field open."""
        while self.quotes % 2:
            try:
                next(self)
            except StopIteration:
                break
            except LineTooLong:
                continue  # counted as passed already
            self.given -= 1
            self.passed += 1
        self.mark()

    def _count(self, text: str) -> None:
        if self._fresh and text.strip():
            self.record_start, self._fresh = self.line, False
        self.quotes += text.count('"')

    def _read_past(self, line: str) -> LineTooLong:
        head, size = line[:HEAD_CHARS], len(line)
        self.passed += 1
        self._count(line)
        while not line.endswith(_LINE_ENDS) and (line := self._readline(CHUNK)):
            size += len(line)
            self.quotes += line.count('"')
        return LineTooLong(LongLine(head, size), self.line)
