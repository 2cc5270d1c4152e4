"""Genre names: parsing the many ways sources write them, spotting misspellings, choosing the label set."""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections import Counter
from typing import Iterable

# The vocabularies MMGCS sources use: TMDb (tmdb5000, tmdb-plots-extra, TMDb CSVs) and IMDb (MM-IMDb).
TMDB_GENRES = (
    "Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Family", "Fantasy", "Foreign",
    "History", "Horror", "Music", "Mystery", "Romance", "Science Fiction", "TV Movie", "Thriller", "War", "Western",
)
IMDB_GENRES = (
    "Action", "Adult", "Adventure", "Animation", "Biography", "Comedy", "Crime", "Documentary", "Drama", "Family",
    "Fantasy", "Film-Noir", "Game-Show", "History", "Horror", "Music", "Musical", "Mystery", "News", "Reality-TV",
    "Romance", "Sci-Fi", "Short", "Sport", "Talk-Show", "Thriller", "War", "Western",
)
KNOWN_GENRES = tuple(sorted(set(TMDB_GENRES) | set(IMDB_GENRES)))


def genre_key(name: str) -> str:
    """The name with case, spaces, underscores and hyphens ignored: "sci_fi", "Sci-Fi" and "SciFi" share a key."""
    return re.sub(r"[\s_\-]+", "", name).lower()


_BY_KEY = {genre_key(g): g for g in KNOWN_GENRES}


def parse_genres(value) -> tuple[list[str], str | None]:
    """Genre names from a list, a TMDb list of {"id", "name"} dicts, a JSON/Python list string or "A|B" / "A, B".

    Returns (names, problem); `problem` describes anything that could not be read (it is reported, not fatal).
    """
    if value is None:
        return [], None
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return [], None
        if s[0] in "[{":
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(s)
                except (ValueError, SyntaxError):
                    return [], f"genres field {s[:80]!r} is neither a list nor a separated string"
        else:
            sep = "|" if "|" in s else (";" if ";" in s else ",")
            value = s.split(sep)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return [], f"genres field has type {type(value).__name__}; expected a list of names"
    names, bad = [], []
    for item in value:
        if isinstance(item, dict):
            item = item.get("name")
        if isinstance(item, str) and item.strip():
            names.append(" ".join(item.split()))
        else:
            bad.append(item)
    return names, (f"ignored genre entries that are not names: {bad[:5]!r}" if bad else None)


def canonical_genre(name: str) -> tuple[str, str | None]:
    """(name to use, note). Case/space/hyphen variants of a known genre map to it; unknown names stay as given,
    with a note naming the closest known genre, so a misspelling is reported rather than silently learned."""
    if name in KNOWN_GENRES:
        return name, None
    known = _BY_KEY.get(genre_key(name))
    if known is not None:
        return known, f"genre {name!r} written as {known!r}"
    close = difflib.get_close_matches(name, KNOWN_GENRES, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]!r}? (fix it with --rename-genre '{name}={close[0]}')" if close else ""
    return name, f"unknown genre {name!r}{hint}"


def parse_renames(items: Iterable[str], form: str = "OLD=NEW", example: str = "Comdy=Comedy") -> dict[str, str]:
    """`--rename-genre` values → {old name: new name}; a value without a name on each side of "=" is an error."""
    renames = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"--rename-genre {item!r} must look like {form} (e.g. '{example}')")
        renames[old.strip()] = new.strip()
    return renames


def select_labels(
    counts: Counter, min_count: int, explicit: list[str] | None = None
) -> tuple[list[str], dict[str, int]]:
    """The label names and the genres left out of them (name -> count).

    `explicit` (from --genres) is used as given, in its order; otherwise every genre with at least `min_count`
    movies, sorted by name so the label order is stable.
    """
    if explicit:
        missing = [g for g in explicit if counts.get(g, 0) == 0]
        if missing:
            raise ValueError(
                f"--genres names {missing} but no movie has them. Genres in the data: "
                f"{', '.join(f'{g} ({n})' for g, n in counts.most_common())}."
            )
        labels = list(dict.fromkeys(explicit))
    else:
        labels = sorted(g for g, n in counts.items() if n >= min_count)
        if not labels:
            raise ValueError(
                f"No genre has at least {min_count} movies (the most frequent: "
                f"{', '.join(f'{g} ({n})' for g, n in counts.most_common(5))}). Lower --min-genre-count or pass --genres."
            )
    removed = {g: n for g, n in sorted(counts.items()) if g not in labels}
    return labels, removed
