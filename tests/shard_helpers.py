"""What the sharded-predict tests share: a tiny bundle, a 23-row source with bad rows and a repeated id, the
command's parsed arguments, the one-process reference output and the exact comparison, the parts run in-process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_helpers import image_bytes
from engine_helpers import GENRES

from mmgcs.batch_predict import load_predictor, predict_file
from mmgcs.cli import build_parser
from mmgcs.sharded_predict import merge_and_report, run_part
from mmgcs.testing import tiny_model

BATCH = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "model"
    tiny_model(GENRES).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """23 movies of plots of many lengths (batches pad differently), a poster, a repeated id, two bad rows."""
    root = tmp_path_factory.mktemp("movies")
    (root / "posters").mkdir()
    (root / "posters" / "p.jpg").write_bytes(image_bytes(size=(40, 60)))
    rows = [{"id": i, "title": f"Movie {i}", "plot": "a detective hunts a killer in the rain " * (1 + i % 6)}
            for i in range(20)]
    rows[3]["poster_file"] = "posters/p.jpg"
    rows[7] = {"id": 7, "title": "Empty", "plot": ""}  # no plot, no poster: its row's error
    rows += [{"id": 5, "title": "Again", "plot": "the same id on a second row"}, {"id": 21, "plot": "x" * 10_001},
             {"id": 22, "title": "Last", "plot": "a family on a journey"}]
    path = root / "movies.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def args_of(*argv) -> object:
    return build_parser().parse_args(["predict", *map(str, argv)])


def one_process(bundle: Path, source: Path, out: Path, batch_size: int = BATCH, **options) -> Path:
    """What `mmgcs predict` writes in one process (the reference): the same batch size, or other batches; its
    predictor loaded as the command loads it (the fast path unless MMGCS_FAST_PATH=0)."""
    predictor = load_predictor(args_of("--model", bundle, "--input", source, "--out", out))
    predict_file(predictor, str(source), out, batch_size=batch_size, progress=False, **options)
    return out


def same_output(a: Path, b: Path) -> None:
    if a.suffix == ".parquet":
        assert pq.read_table(a).to_pylist() == pq.read_table(b).to_pylist()
    else:
        assert a.read_bytes() == b.read_bytes()


def run_parts_here(args, count: int) -> int:
    """Every part in this process, one after the other, then the merge (what N processes and the main one do)."""
    for index in range(count):
        assert run_part(args, index, count, progress=False) == 0
    return merge_and_report(Path(args.out), count, time.time())
