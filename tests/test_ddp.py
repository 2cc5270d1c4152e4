"""Two-process data-parallel training on CPU with `accelerate launch` (gloo): one model, every movie scored once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine_helpers import REPO_ROOT, TINY_TOWERS, build_dataset, subprocess_env

from mmgcs.testing import tiny_text_backbone_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_keeps_replicas_identical_and_scores_each_movie_once(tmp_path):
    from datasets import Image

    from mmgcs import GenreClassifier
    from mmgcs.processor import GenreProcessor
    from mmgcs.data import load_movies

    data = build_dataset(tmp_path, n=45, poster_every=2, plot_every=1)
    splits = load_movies(data)
    # Sizes that 2 processes x batch 4 do not divide: accelerate pads the last batch with repeated rows.
    assert len(splits["validation"]) % 8 and len(splits["test"]) % 8
    out = tmp_path / "run"
    settings = {
        "data.path": data,
        "train.output_dir": out,
        "train.epochs": 2,
        "train.freeze_epochs": 1,  # stage 2 unfreezes the image tower's last block: DDP must cope
        "train.image_finetune": "partial",
        "train.image_trainable_blocks": 1,
        "train.batch_size": 4,
        "train.eval_batch_size": 4,
        "train.lr": 0.01,
        "train.log_with": "none",
        "train.cache_dir": tmp_path / "cache",
        "train.early_stopping_patience": 0,
        **TINY_TOWERS,
        "model.text_backbone": tiny_text_backbone_dir(),
    }
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU")  # the engine itself must pick the CPU backend when no GPU is visible
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(REPO_ROOT / "training" / "train_fusion.py"), *[f"{k}={v}" for k, v in settings.items()],
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    for record in history:
        assert record["processes"] == 2 and record["replicas_in_sync"] is True
        assert record["val_n_samples"] == len(splits["validation"])
    assert history[1]["trainable_parameters"] > history[0]["trainable_parameters"]
    # stage 1 reads both frozen towers from the cache; stage 2 trains the image tower and still reads the text one
    assert [r["inputs"] for r in history] == ["features", "raw+text_features"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n_samples"] == len(splits["test"])
    assert metrics["validation"]["n_samples"] == len(splits["validation"])

    # The gathered predictions are exactly the test rows, in order: the saved model, run in this one process,
    # gives the same probabilities row by row (no row twice, none missing, no rank with other weights).
    saved = np.load(out / "test_predictions.npz")
    assert saved["ids"].tolist() == splits["test"]["id"]
    model = GenreClassifier.from_pretrained(out / "model")
    assert model.lexical is not None and model.lexical.fitted  # fitted on rank 0, given to rank 1 by DDP's broadcast
    test = splits["test"].cast_column("poster", Image(decode=False))
    with torch.no_grad():
        # The text the model was trained on: its plot under the bundle's text_template (e.g. "{title}. {plot}").
        processor = GenreProcessor.from_model(model)
        batch = processor(processor.compose(test["plot"], test["title"]), test["poster"])
        probs = model.probabilities(model(**batch)["logits"])
    np.testing.assert_allclose(saved["probs"], probs.numpy(), atol=1e-5, rtol=1e-4)
