"""mmgcs/doctor.py: `mmgcs doctor`, the environment report. Its table and JSON name every check (run as the console
script runs it), the Hub shows as a warning offline, and a missing pinned package fails the report with the remedy."""

from __future__ import annotations

import json

from test_cli import mmgcs


def test_doctor_table_and_json():
    table = mmgcs("doctor")
    assert table.returncode in (0, 1), table.stderr
    for item in ("python", "torch", "cuda", "bf16", "threads", "transformers", "embedded text backbone",
                 "hugging face hub", "HF_HUB_OFFLINE=1", "feature cache", "browser test"):
        assert item in table.stdout
    report = json.loads(mmgcs("doctor", "--json").stdout)
    names = {c["name"] for c in report["checks"]}
    assert {"python", "torch", "timm", "datasets", "hugging face hub"} <= names
    assert report["ok"] == (table.returncode == 0) == all(c["status"] != "fail" for c in report["checks"])
    hub = next(c for c in report["checks"] if c["name"] == "hugging face hub")
    assert hub["status"] == "warn" and hub["remedy"]  # HF_HUB_OFFLINE=1 in the tests


def test_doctor_fails_with_the_remedy_when_a_pinned_package_is_missing(tmp_path, monkeypatch, capsys):
    from mmgcs import doctor

    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch  # comment\nno-such-package-mmgcs==1.0\n", encoding="utf-8")
    checks = doctor.dependency_checks(reqs)
    assert [c.status for c in checks] == ["ok", "fail"]
    assert "pip install" in checks[1].remedy and "no-such-package-mmgcs==1.0" in checks[1].remedy
    monkeypatch.setattr(doctor, "run_checks", lambda cache: [doctor.python_check(), *checks])
    assert doctor.main(type("Args", (), {"json": False, "cache_dir": str(tmp_path)})()) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 required item(s) missing" in out
