"""mmgcs/data/outfiles.py: whether an output file or folder can be written, asked before the work (a folder where a
file is named, a file in the way of a folder, a read-only place, a full disk), leaving nothing behind."""

import pytest

from mmgcs.data import outfiles
from mmgcs.data.outfiles import unwritable_file, unwritable_folder


def test_a_writable_file_creates_its_folders_and_leaves_no_probe(tmp_path):
    out = tmp_path / "a" / "b" / "preds.jsonl"
    assert unwritable_file(out) is None
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []  # the probe is gone, the file not created


def test_an_existing_file_is_left_as_it_is(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("kept\n")
    assert unwritable_file(out) is None
    assert out.read_text() == "kept\n"


def test_a_folder_named_as_the_file_says_so_with_an_example(tmp_path):
    assert unwritable_file(tmp_path) == f"it is a folder; name a file inside it (e.g. {str(tmp_path / 'out')!r})"
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    assert "e.g. " + repr(str(folder / "out.jsonl")) in unwritable_file(folder)


def test_a_file_in_the_way_of_a_folder(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert unwritable_folder(blocker).startswith("it is a file, not a folder")
    assert unwritable_folder(blocker / "sub") == f"{str(blocker)!r} is a file, not a folder"
    assert unwritable_file(blocker / "out.json") == f"{str(blocker)!r} is a file, not a folder"
    assert unwritable_folder(tmp_path / "new" / "folder") is None and (tmp_path / "new" / "folder").is_dir()


def test_a_full_disk_names_the_reason_and_removes_the_probe(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outfiles.os, "fsync", full)
    problem = unwritable_folder(tmp_path)
    assert "No space left on device" in problem and "free space" in problem
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_refuses_files_names_the_reason(tmp_path, monkeypatch):
    """As a read-only folder answers (simulated: root, which runs these tests in CI images, writes through modes)."""
    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outfiles.tempfile, "mkstemp", refused)
    problem = unwritable_file(tmp_path / "out.jsonl")
    assert problem == (f"nothing can be written in {str(tmp_path)!r} (Permission denied); pick another place or fix "
                       "its permissions")
