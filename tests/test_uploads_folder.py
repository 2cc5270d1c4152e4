"""mmgcs.uploads, the upload folder (issue 18): the app's own folder removed at exit (a SIGTERM too), the folder's
measure, the multipart part count, the posters' thumbnails and the inline heat map."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from mmgcs.uploads import (
    UPLOAD_FOLDER_PREFIX,
    Thumbnails,
    UploadFolder,
    _PartCounter,
    folder_bytes,
    inline_image,
    own_upload_folder,
    remove_stale_folders,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_app_gets_a_folder_of_its_own_unless_one_is_set(tmp_path):
    env = {"GRADIO_TEMP_DIR": str(tmp_path / "mine")}
    assert own_upload_folder(env, parent=tmp_path) == (tmp_path / "mine", False)
    env = {}
    folder, own = own_upload_folder(env, parent=tmp_path)
    assert own and folder.is_dir() and folder.parent == tmp_path
    assert folder.name.startswith(f"{UPLOAD_FOLDER_PREFIX}{os.getpid()}-") and env["GRADIO_TEMP_DIR"] == str(folder)


def test_folders_left_by_processes_that_are_gone_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{UPLOAD_FOLDER_PREFIX}{gone.stdout.strip()}-abc"
    (stale / "x").mkdir(parents=True)
    (stale / "x" / "poster.png").write_bytes(b"1" * 100)
    alive = tmp_path / f"{UPLOAD_FOLDER_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    other = tmp_path / "gradio"
    other.mkdir()
    assert remove_stale_folders(tmp_path) == [stale]
    assert not stale.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_the_own_folder_is_removed_when_the_process_stops(tmp_path, how):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from mmgcs.uploads import clean_up_at_exit, own_upload_folder
        folder, own = own_upload_folder(os.environ, parent={str(tmp_path)!r})
        (folder / "abc").mkdir()
        (folder / "abc" / "poster.png").write_bytes(b"x" * 1000)
        clean_up_at_exit(folder, own)
        print(folder, flush=True)
        if {how!r} == "sigterm":
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            except KeyboardInterrupt:  # what Gradio's launch() stops on
                sys.exit(0)
    """)
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr
    folder = Path(run.stdout.strip())
    assert folder.parent == tmp_path and not folder.exists()


def test_the_folder_measure_counts_accepted_uploads_until_the_next_scan(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(b"1" * 300)
    (tmp_path / "a" / "link.png").symlink_to("/dev/zero")  # not a regular file: not counted, not read
    assert folder_bytes(tmp_path) == 300
    folder = UploadFolder(tmp_path, max_bytes=1000, rescan_s=3600)
    assert folder.used() == 300
    folder.add(500)
    (tmp_path / "a" / "two.png").write_bytes(b"2" * 500)
    assert folder.used() == 800  # not scanned again yet: the upload was counted when accepted
    folder.rescan_s = 0
    assert folder.used() == 800
    assert "upload space is full" in folder.full_message(folder.used()) and "1,000" not in folder.full_message(0)


def test_a_slow_scan_is_spaced_out_and_the_uploads_accepted_meanwhile_still_count(tmp_path, monkeypatch):
    from mmgcs import uploads

    now = [0.0]
    scans = []

    def scan(path):  # a folder that takes 2 s to measure (e.g. tens of thousands of uploads)
        scans.append(now[0])
        now[0] += 2.0
        return folder_bytes(path)

    monkeypatch.setattr(uploads, "folder_bytes", scan)
    (tmp_path / "one.png").write_bytes(b"1" * 300)
    folder = UploadFolder(tmp_path, max_bytes=1000, rescan_s=1.0, clock=lambda: now[0])
    assert folder.used() == 300 and scans == [0.0]
    folder.add(500)
    now[0] += 60  # past rescan_s, but a 2 s scan may run once every 2 / SCAN_SHARE s
    assert folder.used() == 800 and scans == [0.0]
    (tmp_path / "one.png").unlink()  # deleted (Gradio's delete_cache): seen at the next scan
    now[0] = 2.0 / uploads.SCAN_SHARE
    assert folder.used() == 0 and len(scans) == 2


def _multipart(boundary: bytes, n_files: int, size: int = 50) -> bytes:
    parts = b"".join(
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="f%d.png"\r\n' % i
        + b"Content-Type: image/png\r\n\r\n" + bytes([65 + i % 26]) * size + b"\r\n"
        for i in range(n_files)
    )
    return parts + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("n_files", [1, 2, 5])
def test_the_part_count_sees_every_part_however_the_body_is_cut(n_files):
    boundary = b"----mmgcsBoundary42"
    body = _multipart(boundary, n_files)
    second = body.find(b"--" + boundary, 1)  # where the second part's delimiter starts
    for chunk in (1, 2, 3, 7, len(boundary) + 1, len(boundary) + 3, 64, len(body)):
        counter = _PartCounter(boundary)
        passed, cut = b"", None
        for start in range(0, len(body), chunk):
            data = body[start:start + chunk]
            cut = counter.feed(data, max_parts=1)
            if cut is not None:
                passed += data[:cut]
                break
            passed += data
        if n_files == 1:
            assert cut is None and counter.parts == 1 and passed == body
        else:  # stopped at the second part's delimiter line: nothing of its content was passed on
            assert cut is not None and counter.parts == 2
            assert passed == body[:second + len(boundary) + 4], chunk


def test_thumbnails_are_small_kept_by_content_and_bounded():
    thumbnails = Thumbnails(size=100, capacity=2)
    big = Image.new("RGB", (400, 800), (200, 10, 10))
    small = thumbnails.put(b"poster-1", big)
    assert small.size == (50, 100) and thumbnails.get(b"poster-1") is small
    assert thumbnails.get(b"poster-2") is None
    little = Image.new("RGB", (40, 60))
    assert thumbnails.put(b"poster-2", little).size == (40, 60)
    thumbnails.put(b"poster-3", little)
    assert thumbnails.get(b"poster-1") is None  # the least recently used went first
    assert thumbnails.put(b"poster-4", None) is None


def test_an_inline_image_is_a_data_url_and_no_file():
    value = inline_image(Image.new("RGB", (30, 40), (1, 2, 3)))
    assert value["path"] is None and value["meta"] == {"_type": "gradio.FileData"}
    head, data = value["url"].split(",", 1)
    assert head == "data:image/webp;base64"
    decoded = Image.open(__import__("io").BytesIO(base64.b64decode(data)))
    assert decoded.size == (30, 40) and value["size"] == len(base64.b64decode(data))
    assert inline_image(None) is None


def test_sigterm_is_left_alone_outside_the_main_thread():
    import threading

    from mmgcs.uploads import clean_up_at_exit

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=clean_up_at_exit, args=(Path("/nonexistent"), False))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) == before
