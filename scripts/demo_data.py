"""Where `make demo` / `make train` get their movies, decided before anything is installed or built.

    python3 scripts/demo_data.py check --shared ../shared/data            # prints "shared" or "hub:<dataset id>"
    python scripts/demo_data.py fetch --dataset <id> --out data/movies     # (the venv's python) a Hub copy

Beside the team's data (`SHARED/tmdb5000/movies.jsonl`) the dataset is built from it. Elsewhere the dataset id the
README's front matter names is downloaded when the Hub answers. Otherwise `check` exits 2 at once with one message
saying what data is needed, in which layout, and how to point `make` at it — nothing has been created by then.
`check` uses the standard library only, so it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRUE = {"1", "true", "yes", "on"}


def readme_dataset_id(readme: Path) -> str | None:
    """The first id under `datasets:` in the README's YAML front matter."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    front = text.split("---", 2)[1] if text.startswith("---") else ""
    block = re.search(r"^datasets:\n((?:\s+- .+\n)+)", front, flags=re.M)
    return block.group(1).split("- ", 1)[1].split()[0] if block else None


def hub_answers(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                                      method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, ValueError):
        return False


def missing_data_message(shared: Path, dataset_id: str | None) -> str:
    hub = (f"the Hub dataset {dataset_id} (the README's front matter) could not be reached"
           + (" because HF_HUB_OFFLINE=1 (the Makefile's default; run with HF_HUB_OFFLINE=0 to use the Hub)"
              if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE else "")) if dataset_id else "no Hub dataset is named"
    return (
        f"make: no movie data. The demo needs the team's TMDB data at {shared}, and {hub}.\n"
        f"  Layout: {shared}/tmdb5000/movies.jsonl (id, title, plot, genres, poster_file) with the posters beside it "
        f"in {shared}/tmdb5000/, and optionally {shared}/tmdb-plots-extra/movies.jsonl (plot-only movies).\n"
        "  Point make at it:  make demo SHARED=/path/to/data   (or build your own: "
        "python -m mmgcs.data build --source movies.csv --out data/movies; see README section 1).\n"
        "Nothing was installed or built."
    )


def check(shared: Path, readme: Path) -> int:
    if (shared / "tmdb5000" / "movies.jsonl").is_file():
        print("shared")
        return 0
    dataset_id = readme_dataset_id(readme)
    if dataset_id and hub_answers():
        print(f"hub:{dataset_id}")
        return 0
    print(missing_data_message(shared, dataset_id), file=sys.stderr)
    return 2


def fetch(dataset_id: str, out: Path) -> int:
    """Download the dataset folder (parquet shards, card, build report) next to `out`, then move it into place, so
    an interrupted download leaves nothing half-built."""
    from huggingface_hub import snapshot_download

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=out.parent))
    try:
        snapshot_download(dataset_id, repo_type="dataset", local_dir=staging)
        if not any((staging / "data").glob("*.parquet")):
            print(f"make: the Hub dataset {dataset_id} has no data/*.parquet shards: not an MMGCS dataset.", file=sys.stderr)
            return 2
        report = staging / "build_report.json"  # make's target: a dataset pushed without one still counts as built
        if not report.is_file():
            report.write_text(json.dumps({"downloaded_from": dataset_id}) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("--shared", type=Path, required=True)
    c.add_argument("--readme", type=Path, default=REPO / "README.md")
    f = sub.add_parser("fetch")
    f.add_argument("--dataset", required=True)
    f.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    return check(args.shared, args.readme) if args.command == "check" else fetch(args.dataset, args.out)


if __name__ == "__main__":
    sys.exit(main())
