"""The builder reads poster files only inside their source folder, only regular files, boundedly, and its report
never quotes a file (issue 9). Sources are made in tmp_path; "outside" files stand for /etc/passwd and friends."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from data_helpers import image_bytes, write_jsonl_source
from mmgcs.data.build import BuildOptions, build
from mmgcs.data.confine import Refusal, inside, read_confined

MARKER = "ROOT-SECRET-7f3a9c"  # stands for a secret: it must never reach build_report.json
SECRET = f"{MARKER}:x:0:0:root:/root:/bin/bash\n".encode()
OUTSIDE_JPEG = image_bytes("JPEG", size=(30, 40), seed=99)


def _row(i, poster=None, plot=True):
    row = {"id": i, "title": f"T{i}", "plot": f"Plot {i}." if plot else None, "genres": ["Drama"]}
    if poster is not None:
        row["poster_file"] = poster
    return row


def _build(src: Path, out: Path, timeout: float = 60.0):
    """build() in a daemon thread: a FIFO read that blocks fails the test instead of hanging the suite."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(r=build(BuildOptions(
        sources=[str(src)], out=str(out), min_genre_count=1, progress=False))), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the build hung on a poster file"
    return box["r"]


@pytest.fixture()
def outside(tmp_path):
    """Files outside any source folder: an image (would be embedded) and a secret (would be quoted)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "image.jpg").write_bytes(OUTSIDE_JPEG)
    (d / "passwd").write_bytes(SECRET)
    return d


def _by_id(result):
    return {r["id"]: r for split in result.dataset.values() for r in split}


def _events(result, movie_id):
    return [e for e in result.report["events"] if e["id"] == movie_id]


def test_poster_paths_out_of_the_source_folder_are_refused_and_reported(tmp_path, outside):
    src = tmp_path / "src"
    rows = [_row(1, str(outside / "image.jpg")),  # absolute
            _row(2, "../elsewhere/image.jpg"),  # ../
            _row(3, "posters/link.jpg"),  # symlink pointing out
            _row(4, "posters/../../elsewhere/image.jpg"),
            _row(5, str(outside / "image.jpg"), plot=False),  # nothing left: dropped, as a missing poster is
            _row(6, "posters/inner-link.jpg"),  # a symlink that stays inside is fine
            _row(7, "posters/ok.jpg")]
    write_jsonl_source(src, rows, {"ok.jpg": image_bytes(seed=1)})
    (src / "posters" / "link.jpg").symlink_to(outside / "image.jpg")
    (src / "posters" / "inner-link.jpg").symlink_to(src / "posters" / "ok.jpg")
    result = _build(src, tmp_path / "out")
    kept = _by_id(result)
    for movie_id in (1, 2, 3, 4):
        assert kept[movie_id]["poster"] is None and kept[movie_id]["plot"] == f"Plot {movie_id}."
        [event] = _events(result, movie_id)
        assert event["reason"] == "poster_outside_source" and event["action"] == "changed"
        assert "outside the source folder" in event["detail"]
    assert 5 not in kept and [e["reason"] for e in _events(result, 5)] == ["poster_outside_source", "no_plot_no_poster"]
    assert kept[6]["poster"] is not None and kept[7]["poster"] is not None
    assert result.report["changed_by_reason"]["poster_outside_source"] == 5
    assert str(outside) not in _events(result, 3)[0]["detail"]  # the link's target is not told


def test_fifos_devices_and_folders_are_not_read(tmp_path):
    src = tmp_path / "src"
    write_jsonl_source(src, [_row(1, "posters/pipe.jpg"), _row(2, "posters/zero.jpg"), _row(3, "posters/dir.jpg"),
                             _row(4, "posters/ok.jpg")], {"ok.jpg": image_bytes(seed=2)})
    os.mkfifo(src / "posters" / "pipe.jpg")  # nobody ever writes to it: a blocking open or read never returns
    (src / "posters" / "zero.jpg").symlink_to("/dev/zero")  # endless bytes, st_size 0
    (src / "posters" / "dir.jpg").mkdir()
    result = _build(src, tmp_path / "out")
    reasons = {i: [e["reason"] for e in _events(result, i)] for i in (1, 2, 3, 4)}
    assert reasons == {1: ["poster_not_regular_file"], 2: ["poster_outside_source"], 3: ["poster_not_regular_file"], 4: []}
    assert "FIFO" in _events(result, 1)[0]["detail"] and "folder" in _events(result, 3)[0]["detail"]
    assert _by_id(result)[4]["poster"] is not None


def test_report_never_quotes_a_file(tmp_path, outside):
    src = tmp_path / "src"
    write_jsonl_source(src, [_row(1, "posters/secret.jpg"), _row(2, "posters/passwd-link.jpg"),
                             _row(3, str(outside / "passwd")), _row(4, "posters/html.jpg")],
                       {"secret.jpg": SECRET, "html.jpg": b"<html>" + SECRET + b"</html>"})
    (src / "posters" / "passwd-link.jpg").symlink_to(outside / "passwd")
    result = _build(src, tmp_path / "out")
    text = (tmp_path / "out" / "build_report.json").read_text(encoding="utf-8")
    assert MARKER not in text and MARKER not in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    [secret] = _events(result, 1)
    assert secret["reason"] == "invalid_poster" and "not a recognised image" in secret["detail"]
    assert f"({len(SECRET):,} bytes)" in secret["detail"]  # the reason and the size, nothing else
    assert [e["reason"] for e in _events(result, 2)] == [e["reason"] for e in _events(result, 3)] == ["poster_outside_source"]


def test_csv_poster_path_cannot_leave_the_folder(tmp_path, outside):
    src = tmp_path / "csvsrc"
    (src / "img").mkdir(parents=True)
    (src / "img" / "ok.jpg").write_bytes(image_bytes(seed=3))
    lines = ["id,title,overview,genres,poster_url,poster_path",
             "1,One,Plot one.,Drama,,../elsewhere/image.jpg",
             "2,Two,Plot two.,Drama,,/../../elsewhere/image.jpg",
             "3,Three,Plot three.,Drama,,img/ok.jpg"]
    (src / "movies.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = build(BuildOptions(sources=[str(src)], out=str(tmp_path / "out"), min_genre_count=1, progress=False,
                                download_posters=False))
    kept = _by_id(result)
    assert kept[1]["poster"] is None and kept[2]["poster"] is None and kept[3]["poster"] is not None
    assert [e["reason"] for e in _events(result, 1)] == [e["reason"] for e in _events(result, 2)] == ["poster_outside_source"]


def test_mmimdb_poster_symlinked_out_is_refused(tmp_path, outside):
    root = tmp_path / "mmimdb"
    (root / "dataset").mkdir(parents=True)
    for i in (1, 2, 3):
        (root / "dataset" / f"{i:07d}.json").write_text(json.dumps({"plot": [f"Plot {i}."], "genres": ["Drama"]}))
    (root / "dataset" / "0000001.jpeg").symlink_to(outside / "image.jpg")
    (root / "dataset" / "0000002.jpeg").write_bytes(image_bytes(seed=4))
    (root / "dataset" / "0000003.jpeg").write_bytes(image_bytes(seed=5))
    result = build(BuildOptions(sources=[str(root)], out=str(tmp_path / "out"), min_genre_count=1, progress=False))
    kept = _by_id(result)
    assert kept[1]["poster"] is None and kept[2]["poster"] is not None
    assert [e["reason"] for e in _events(result, 1)] == ["poster_outside_source"]


def test_read_confined_is_bounded_and_names_only_the_size(tmp_path):
    (tmp_path / "big.jpg").write_bytes(SECRET * 10)
    refused = read_confined(tmp_path / "big.jpg", tmp_path, max_bytes=len(SECRET))
    assert isinstance(refused, Refusal) and refused.reason == "invalid_poster" and "limit" in refused.detail
    assert MARKER not in refused.detail
    assert read_confined(tmp_path / "big.jpg", tmp_path, max_bytes=len(SECRET) * 10) == SECRET * 10
    missing = read_confined(tmp_path / "nope.jpg", tmp_path, max_bytes=100)
    assert isinstance(missing, Refusal) and missing.reason == "missing_poster_file"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_file_whose_size_lies_is_still_read_boundedly():
    # /proc files say 0 bytes and hold more: the read stops at the limit (here 16 bytes) and refuses
    refused = read_confined(Path("/proc/self/status"), Path("/proc"), max_bytes=16)
    assert isinstance(refused, Refusal) and refused.reason == "invalid_poster" and "limit" in refused.detail


def test_inside_resolves_symlinks_and_dots(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path)
    assert inside(tmp_path / "root" / "a.jpg", tmp_path / "root")
    assert not inside(tmp_path / "root" / ".." / "a.jpg", tmp_path / "root")
    assert not inside(tmp_path / "root" / "out" / "a.jpg", tmp_path / "root")
    assert not inside(Path("/etc/passwd"), tmp_path / "root")
    assert not inside(tmp_path / "rootx" / "a.jpg", tmp_path / "root")  # a prefix of the name is not inside
