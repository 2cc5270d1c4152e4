"""The one training loop behind training/train_{text,image,fusion}.py (Accelerate: CPU, one GPU, many GPUs).

``main(argv, default_config)`` parses the command line; ``run(cfg)`` trains, evaluates and saves in OUTPUT_DIR:
model/ (the best bundle), metrics.json, history.json, config.yaml, plots, checkpoints/epoch_NNN/ (latest and best;
--resume takes the newest intact one) and COMPLETE, written last. Loaders: ``mmgcs.loaders``; calibration:
``mmgcs.calibrate``; the run report: ``mmgcs.report``; the folder lock, bundle swap and checkpoints: ``mmgcs.runs``;
the loop's state and early stopping: ``mmgcs.loop_state``; the Accelerator, its precision and threads and gathering
predictions from every process: ``mmgcs.accelerator``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from mmgcs import calibrate, interrupts, loaders, runs, runtime
from mmgcs.accelerator import gather_predictions, make_accelerator, reset_accelerate_state, set_threads
from mmgcs.accelerator import resolve_mixed_precision  # noqa: F401  (importable from here, as before)
from mmgcs.calibrate import LEXICAL_WEIGHTS  # noqa: F401  (importable from here, as before)
from mmgcs.config import ConfigError, RunConfig, load_config, validate_config
from mmgcs.hub import PushError  # one class for model and dataset uploads
from mmgcs.hub.push import push_run_bundle
from mmgcs.loop_state import LoopState
from mmgcs.models.choices import check_model_choices
from mmgcs.optim import apply_stage, build_optimizer, build_schedule, two_stage
from mmgcs.progress import progress_enabled, set_quiet
from mmgcs.report import flatten_dict, run_metrics, save_finished_run, tracker_config
from mmgcs.runs import TrainingError, latest_checkpoint  # noqa: F401  (importable from here, as before)

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
BUNDLE = "model"
# The validation numbers kept in history.json (val_<name>) and used to pick the best epoch.
SUMMARY = ("loss", "micro_f1", "macro_f1", "micro_macro_f1", "weighted_f1", "samples_f1", "mAP", "n_samples")


def selection_scores(metrics: dict) -> dict:
    """``metrics`` plus the scores an epoch may be chosen by that the metrics do not hold: micro_macro_f1, the
    mean of micro- and macro-F1 (micro alone keeps epochs that trade the rare genres for the frequent ones)."""
    return dict(metrics, micro_macro_f1=(metrics["micro_f1"] + metrics["macro_f1"]) / 2)


# --------------------------------------------------------------------------------------------- command line
def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Train an MMGCS genre classifier. Settings: dataclass defaults < the script's config < --config FILE(s) "
        "< --fast < section.key=value overrides (e.g. data.path=DIR train.epochs=3 train.output_dir=runs/x)."))
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the best bundle when done")
    parser.add_argument("--fast", action="store_true", help="quick experiment: a slice of the data, 2 epochs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (featurizing, caches, epochs)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def main(argv: Optional[Sequence[str]] = None, default_config: Optional[str | Path] = None) -> dict:
    """Entry point of the training scripts. Returns the run's metrics (see ``run``). Ctrl-C or SIGTERM ends it with
    one line naming the last checkpoint and the command that resumes (exit code 130 / 143)."""
    runtime.configure_cpu_policy()  # in time only when torch is not loaded yet; the workers get it either way
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.quiet:
        set_quiet()
    runtime.setup_logging()
    overrides = [*args.overrides, *(["train.resume=true"] if args.resume else []),
                 *([f"train.push_to_hub={args.push_to_hub}"] if args.push_to_hub else [])]
    # Read now: a launcher stopped by the same signal may be gone by the time the line is printed.
    resume = interrupts.rerun_command("--resume", argv)
    with interrupts.stop_on_signals():
        try:
            return run(load_config(([default_config] if default_config else []) + list(args.config), overrides,
                                   fast=args.fast))
        except (ConfigError, TrainingError) as e:
            parser.exit(2, f"error: {e}\n")
        except PushError as e:
            parser.exit(1, f"error: {e}\n")
        except KeyboardInterrupt as e:
            stopped = e if isinstance(e, TrainingInterrupted) else TrainingInterrupted(
                getattr(e, "signum", signal.SIGINT), "interrupted before training started", _main_rank())
            if stopped.is_main:  # the other processes of a launch stop quietly
                print(f"{stopped.where}; rerun with --resume: {resume}", file=sys.stderr, flush=True)
            sys.exit(stopped.exit_code)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM; ``where``: how far it got ("interrupted during epoch 3; the last
    checkpoint is epoch 2"); ``exit_code``: 128 + the signal's number."""

    def __init__(self, signum: int, where: str, is_main: bool):
        super().__init__(where)
        self.signum, self.where, self.is_main = int(signum), where, is_main
        self.exit_code = 128 + self.signum


def _main_rank() -> bool:
    """Whether this is the main process of a launch, read from the launcher's environment (no accelerator needed)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0) == 0


# ------------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig) -> dict:
    """Train, evaluate on the test split and save everything in ``cfg.train.output_dir``; returns metrics.json."""
    validate_config(cfg)
    check_model_choices(cfg.model)  # tower/fusion/pooling names, from the registries, before anything is built
    loaders.head_loss(cfg)  # a bad train.loss setting fails before anything slow
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(getattr(e, "signum", signal.SIGINT), trainer.progress(), trainer.is_main) from None
    finally:
        trainer.close()


class Trainer:
    """One run: setup, the epochs (train, validate, keep the best, checkpoint), then the final evaluation."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.tcfg, self.out = cfg, cfg.train, Path(cfg.train.output_dir)
        self.ckpt_root = self.out / CHECKPOINTS
        self._lock, self._trackers_started = None, False
        self.accelerator = acc = make_accelerator(cfg, find_unused_parameters=two_stage(self.tcfg))
        # Before anything slow (featurizing): the folder is this run's alone and takes writes.
        self._lock = runs.take_run_folder(acc, self.out, self.out / BUNDLE)
        if not self.tcfg.resume:
            runs.check_fresh_folder(self.out, self.ckpt_root, self._lock)
        self._caller_threads = torch.get_num_threads()
        set_threads(runtime.launched_threads(acc.device.type, acc.num_processes, self._caller_threads))
        self.threads, self.is_main = torch.get_num_threads(), acc.is_main_process
        self.state, self.start_epoch, self.loader_kind = LoopState(), 0, "raw"
        self.epoch_running, self.finishing = None, False  # how far the run got (``progress``)
        self.metric_mode = "min" if self.tcfg.metric_for_best == "loss" else "max"
        self.data = self.loaders = self.model = self.optimizer = self.schedule = self.threshold = self._resume_from = None

    def _setup(self) -> None:
        """Data, model, optimizer, the first stage's loaders and the schedule, all prepared by the accelerator."""
        acc, tcfg = self.accelerator, self.tcfg
        try:
            splits, dataset_labels = loaders.load_splits(self.cfg, acc)
            set_seed(tcfg.seed)  # before the model is built: the same initial head on every run and rank
            model = loaders.build_model(self.cfg, dataset_labels)  # with its loss (train.loss)
            runs.check_frozen_weights(model, self._resume_from)  # the checkpoint's towers, before any featurizing
            self.data = loaders.prepare_splits(splits, dataset_labels, model)
        except loaders.SetupError as e:
            raise TrainingError(str(e)) from e.__cause__
        loaders.fit_model_to_data(model, self.data, self.cfg, self.is_main)
        # Optimizer and DDP wrapper over what trains in the final stage (DDP only syncs the parameters that need
        # grads when it is built); a first frozen stage then leaves the towers without grads.
        apply_stage(model, tcfg, tcfg.epochs)
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, tcfg))
        self.threshold = float(model.config.threshold)  # the decision threshold of a genre without a tuned one
        apply_stage(acc.unwrap_model(self.model), tcfg, 0)
        self.loaders = loaders.LoaderFactory(self.data, self.cfg, acc)
        steps_per_epoch = math.ceil(len(self._loaders_for(0)["train"]) / tcfg.grad_accum_steps)
        self.schedule = build_schedule(self.optimizer.optimizer, tcfg, steps_per_epoch, self.metric_mode)
        if self.schedule.scheduler is not None:
            self.schedule.scheduler = acc.prepare(self.schedule.scheduler)

    def _loaders_for(self, epoch: int) -> dict:
        """The prepared loaders of the stage ``epoch`` belongs to (frozen towers read from the feature cache)."""
        self.loader_kind, prepared = self.loaders.for_epoch(self.accelerator.unwrap_model(self.model), epoch)
        set_threads(runtime.stage_threads(self.accelerator.device.type, self.loader_kind == "features", self.threads))
        return prepared

    # ------------------------------------------------------------------------------------------ training
    def fit(self) -> dict:
        t_start = time.time()
        if self.tcfg.resume:
            runs.check_resumed_config(self.out, self.cfg)
            # Verified before anything reads the weights (the cached features are computed from them).
            self._resume_from = runs.pick_checkpoint(self.accelerator, self.ckpt_root, self.out)
        self._setup()
        # Training starts from the seed's RNG state, whatever building the model and the loaders drew (featurizing
        # runs under its own RNG). A resumed run then restores the checkpoint's RNG states.
        set_seed(self.tcfg.seed)
        self._resume()  # nothing to do without --resume: no checkpoint was picked
        runs.collective(self.accelerator, lambda: runs.start_run_folder(self.out, self.cfg) if self.is_main else None,
                        runs.save_failed("the run's settings (config.yaml)", self.out))
        if self.accelerator.log_with:
            self.accelerator.init_trackers(self.out.name or "mmgcs", config=tracker_config(self.cfg))
            self._trackers_started = True
        for epoch in range(self.start_epoch, self.tcfg.epochs):
            if self._run_epoch(epoch):
                break
        return self._finish(time.time() - t_start)

    def _run_epoch(self, epoch: int) -> bool:
        """Train and validate one epoch, keep the best model and a checkpoint; True when the run should stop."""
        acc, tcfg, state, t_epoch = self.accelerator, self.tcfg, self.state, time.time()
        self.epoch_running = epoch + 1
        apply_stage(acc.unwrap_model(self.model), tcfg, epoch)
        prepared = self._loaders_for(epoch)
        train_loss, _ = self._train_epoch(prepared["train"], epoch)
        val = self._evaluate(prepared["validation"])
        summary, metric = val["summary"], tcfg.metric_for_best
        record = {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss,
                  **{f"val_{k}": v for k, v in summary.items()}, "lr": self._lrs(), "inputs": self.loader_kind,
                  "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                  "time_s": round(time.time() - t_epoch, 2)}
        if acc.num_processes > 1:
            record.update(processes=acc.num_processes, replicas_in_sync=runs.replicas_in_sync(acc, acc.unwrap_model(self.model)))
        state.history.append(record)
        improved = state.track_best(summary[metric], epoch + 1, higher=self.metric_mode == "max")
        if self.schedule.interval == "epoch":
            self.schedule.scheduler.step()
        elif self.schedule.interval == "metric":
            self.schedule.scheduler.step(summary[metric])
        if improved:
            self._save_bundle(self.out / BUNDLE, thresholds=val["thresholds"])
        self._save_checkpoint(epoch + 1)
        logger.info("epoch %d/%d: train_loss %.4f val_loss %.4f val_%s %.4f%s (%.0f s, %s)", epoch + 1, tcfg.epochs,
                    train_loss, summary["loss"], metric, summary[metric], " *best*" if improved else "",
                    record["time_s"], self.loader_kind)
        if self._trackers_started:
            acc.log({k: v for k, v in flatten_dict(record).items() if isinstance(v, (int, float))}, step=state.global_step)
        return state.should_stop(tcfg.max_steps, tcfg.early_stopping_patience, metric)

    def _train_epoch(self, loader, epoch: int) -> tuple[float, int]:
        acc, tcfg, state = self.accelerator, self.tcfg, self.state
        self.model.train()
        loader.set_epoch(epoch)
        total, count, steps = torch.zeros((), device=acc.device), 0, 0
        with tqdm(loader, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                  disable=not (acc.is_local_main_process and progress_enabled()),
                  dynamic_ncols=True, leave=False) as bar:  # closed, its line cleared, when Ctrl-C stops the loop
            for batch in bar:
                batch = self.loaders.take(batch)
                with acc.accumulate(self.model):
                    loss = self.model(**batch)["loss"]
                    acc.backward(loss)
                    if acc.sync_gradients and tcfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), tcfg.max_grad_norm)
                    self.optimizer.step()
                    if acc.sync_gradients and self.schedule.interval == "step" and not acc.optimizer_step_was_skipped:
                        self.schedule.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += loss.detach().float()
                count += 1
                if acc.sync_gradients:
                    state.global_step += 1
                    steps += 1
                    if state.global_step % tcfg.log_every == 0:
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                        if self._trackers_started:
                            acc.log({"train/loss": loss.item(), **{f"train/{k}": v for k, v in self._lrs().items()}},
                                    step=state.global_step)
                    if tcfg.max_steps and state.global_step >= tcfg.max_steps:
                        break
        return float(acc.reduce(total / max(count, 1), reduction="mean").item()), steps

    def _lrs(self) -> dict:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    # ---------------------------------------------------------------------------------------- evaluation
    def _predict(self, loader, hide: Optional[str] = None) -> dict[str, np.ndarray]:
        return gather_predictions(self.accelerator, self.model, loader, self.loaders.take, self.data, hide)

    def _tune(self, pred: dict) -> Optional[list[float]]:
        return calibrate.thresholds(pred, self.data.task, self.tcfg.tune_thresholds,
                                    self.tcfg.threshold_min_positives, self.threshold)

    def _score(self, pred: dict, thresholds: Optional[list[float]]) -> dict:
        """Metrics under ``thresholds`` (None: the model's one threshold for every genre)."""
        return self.data.score(pred, thresholds if thresholds is not None else self.threshold)

    def _evaluate(self, loader) -> dict:
        """Validation: metrics computed once, on the main process, then shared so every rank decides alike."""
        pred = self._predict(loader)
        result = [None]
        if self.is_main:
            thresholds = self._tune(pred)
            metrics = selection_scores(dict(self._score(pred, thresholds), loss=self.data.loss(pred)))
            result = [{"summary": {k: metrics[k] for k in SUMMARY}, "thresholds": thresholds}]
        broadcast_object_list(result)
        return result[0]

    def _set_model_config(self, **values) -> dict:
        """The one place the run writes into the model's config: the calibration (decision thresholds, branch
        weights), for good or while one bundle is saved or one prediction made. Returns the values replaced."""
        config = self.accelerator.unwrap_model(self.model).config
        previous = {k: getattr(config, k) for k in values}
        for key, value in values.items():
            setattr(config, key, value)
        return previous

    # ------------------------------------------------------------------------------ checkpoints and finish
    def _save_bundle(self, folder: Path, thresholds: Optional[list[float]] = None) -> None:
        """Write the unwrapped model (no DDP `module.` prefix) as a Hub bundle, replacing ``folder`` atomically."""
        self.accelerator.wait_for_everyone()
        def write() -> None:  # noqa: E306
            previous = self._set_model_config(thresholds=thresholds)
            try:
                runs.replace_folder(folder, self.accelerator.unwrap_model(self.model).save_pretrained)
            finally:
                self._set_model_config(**previous)
        runs.collective(self.accelerator, lambda: write() if self.is_main else None, runs.save_failed("the best model", folder))

    def _save_checkpoint(self, epoch: int) -> None:
        runs.save_checkpoint(self.accelerator, self.ckpt_root, epoch,
                             self.state.to_json(epoch, self.tcfg.epochs, self.tcfg.metric_for_best),
                             keep={f"epoch_{self.state.best_epoch:03d}"},
                             after=lambda: runs.write_json_atomic(self.out / "history.json", self.state.history))

    def _resume(self) -> None:
        ckpt = self._resume_from  # verified in fit (runs.pick_checkpoint, which warns when there is none yet)
        if ckpt is None:
            return
        self.state, done = LoopState.from_checkpoint(ckpt)
        apply_stage(self.accelerator.unwrap_model(self.model), self.tcfg, done)
        runs.load_checkpoint(self.accelerator, ckpt)  # without the frozen towers: checked against their digest
        self.start_epoch = self.state.resumed_at(done, self.tcfg.epochs, self.tcfg.early_stopping_patience, ckpt)

    def _finish(self, train_time: float) -> dict:
        acc, state, data = self.accelerator, self.state, self.data
        self.finishing = True
        acc.wait_for_everyone()
        runs.load_bundle_weights(acc.unwrap_model(self.model), self.out / BUNDLE)
        # The inputs of the last epoch run: its cached towers were frozen up to then, so their features hold for
        # the best model (a resumed finished run has only built the first stage's loaders so far).
        prepared = self._loaders_for(max(len(state.history) - 1, 0))
        # Branch weights first (thresholds are tuned under them); every process makes the same choice from the
        # same gathered predictions.
        weights, val_pred = calibrate.branch_weights(acc.unwrap_model(self.model).config, self._set_model_config,
                                                     lambda: self._predict(prepared["validation"]), data.labels,
                                                     self._tune, self.threshold)
        val_pred = self._predict(prepared["validation"]) if val_pred is None else val_pred
        test_pred = self._predict(prepared["test"])
        hidden = {m: self._predict(prepared["test"], hide=m) for m in data.modalities if len(data.modalities) > 1}
        result, saved = [None], None
        if self.is_main:
            thresholds = self._tune(val_pred)
            metrics = run_metrics(lambda p: self._score(p, thresholds), val_pred, test_pred, hidden, state, train_time,
                                  thresholds, data, self.cfg, weights)
            saved, result = (metrics, thresholds, test_pred, hidden), [metrics]
        runs.collective(acc, lambda: self._save_outputs(*saved) if saved else None,
                        runs.save_failed("the final model and metrics", self.out))
        broadcast_object_list(result)
        acc.wait_for_everyone()
        if self.tcfg.push_to_hub and self.is_main:
            logger.info("Pushed the bundle to %s", push_run_bundle(self.out / BUNDLE, self.tcfg.push_to_hub, self.out))
        return result[0]

    def _save_outputs(self, metrics: dict, thresholds, test_pred: dict, hidden: dict) -> None:
        self._set_model_config(thresholds=thresholds)  # the bundle decides with the thresholds tuned on validation
        test = self.data.splits["test"]
        save_finished_run(self.out, BUNDLE, self.accelerator.unwrap_model(self.model), self.cfg.data.path, metrics,
                          self.state.history, test_pred, hidden, test["id"] if "id" in test.column_names else None)

    def progress(self) -> str:
        """How far the run got, for the line an interrupted run ends with: the epoch it was in and the last
        checkpoint on disk (what --resume continues from)."""
        last = runs.latest_checkpoint(self.out)
        saved = runs.checkpoint_epoch(last) if last is not None else None
        since = f"the last checkpoint is epoch {saved}" if saved else "no checkpoint yet"
        if self.finishing:
            return f"interrupted after epoch {len(self.state.history)}, the last, during the final evaluation"
        if self.epoch_running is None:
            return f"interrupted before epoch {(saved or 0) + 1} started; {since}"
        if saved == self.epoch_running:
            return f"interrupted after epoch {saved}"
        return f"interrupted during epoch {self.epoch_running}; {since}"

    def close(self) -> None:
        try:
            if self._trackers_started:
                self.accelerator.end_training()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()
        torch.set_num_threads(self._caller_threads)  # a run inside a notebook or a test leaves its threads as found
        reset_accelerate_state()


__all__ = ["PushError", "Trainer", "TrainingError", "latest_checkpoint", "main", "resolve_mixed_precision", "run"]
