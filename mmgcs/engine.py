"""The one training loop behind training/train_{text,image,fusion}.py (Accelerate: CPU, one GPU, many GPUs).

``main(argv, default_config)`` parses the command line; ``run(cfg)`` trains, evaluates and saves:

    OUTPUT_DIR/model/            best bundle (safetensors + config.json + tokenizer + README.md with model-index)
    OUTPUT_DIR/metrics.json      test (and validation) metrics of the best model, per genre, thresholds
    OUTPUT_DIR/history.json      one record per epoch
    OUTPUT_DIR/config.yaml       the fully resolved config (loadable with --config)
    OUTPUT_DIR/*.png, metrics.md training curves, per-genre F1
    OUTPUT_DIR/checkpoints/      epoch_NNN/ (accelerate save_state + trainer_state.json + MANIFEST.json of
                                 sha256 digests): latest and best kept; --resume takes the newest intact one
    OUTPUT_DIR/COMPLETE          written last, once the run has finished (`make train` targets it)

The folder is locked while a run uses it; the locking, the recoverable bundle swap and the checkpoint checks
live in mmgcs.runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from mmgcs.config import ConfigError, RunConfig, config_to_dict, load_config, save_config, validate_config
from mmgcs.hub import PushError, is_hub_id  # PushError: one class for model and dataset uploads
from mmgcs.report import flatten_dict
from mmgcs import runs
from mmgcs.runs import TrainingError  # defined with the run-folder checks; importable from here as before

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# Weights of the lexical branch tried on validation at the end of a run (0 = the fused head alone).
LEXICAL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
BUNDLE = "model"
STATE_FILE = "trainer_state.json"
# Modalities a batch may carry, by the key prefix of their presence masks (`text_mask`, `image_mask`).
MODALITIES = ("text", "image")


# --------------------------------------------------------------------------------------------- command line
def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train an MMGCS genre classifier. Settings: dataclass defaults < the script's config < --config FILE(s) "
            "< --fast < section.key=value overrides (e.g. data.path=DIR train.epochs=3 train.output_dir=runs/x)."
        ),
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the best bundle when done")
    parser.add_argument("--fast", action="store_true", help="quick experiment: a slice of the data, 2 epochs")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def main(argv: Optional[Sequence[str]] = None, default_config: Optional[str | Path] = None) -> dict:
    """Entry point of the training scripts. Returns the run's metrics (see ``run``)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    _setup_logging()
    paths = ([default_config] if default_config else []) + list(args.config)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    if args.push_to_hub:
        overrides.append(f"train.push_to_hub={args.push_to_hub}")
    try:
        cfg = load_config(paths, overrides, fast=args.fast)
        return run(cfg)
    except (ConfigError, TrainingError) as e:
        parser.exit(2, f"error: {e}\n")
    except PushError as e:
        parser.exit(1, f"error: {e}\n")


def _setup_logging() -> None:
    level = logging.INFO if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0) == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    # accelerate reports every file of every checkpoint at INFO
    logging.getLogger("accelerate").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------- accelerator
def resolve_mixed_precision(value: str) -> str:
    """"auto": whatever `accelerate launch --mixed_precision` asked for, else bf16/fp16 on a GPU that has it."""
    if value != "auto":
        return value
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio"}


def resolve_trackers(spec: str) -> Optional[list[str]]:
    """`train.log_with` → accelerate's `log_with`. "auto" picks TensorBoard when it is installed."""
    from accelerate.utils import is_tensorboard_available

    spec = (spec or "").strip().lower()
    if spec in ("", "none", "no", "false"):
        return None
    if spec == "auto":
        return ["tensorboard"] if is_tensorboard_available() else None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    import importlib.util

    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; choose from {sorted(TRACKER_PACKAGES)}, auto or none")
        package = TRACKER_PACKAGES[name]
        if name == "tensorboard":
            ok = is_tensorboard_available()
        else:
            ok = importlib.util.find_spec(package) is not None
        if not ok:
            raise ConfigError(f"train.log_with: {name} is not installed; `pip install {package}` or set train.log_with=none")
    return names


def make_accelerator(cfg: RunConfig, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    out = Path(cfg.train.output_dir)
    return Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a GPU-less machine trains independent copies.
        cpu=not _has_accelerator_device(),
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=resolve_trackers(cfg.train.log_with),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Seedable sampler: the shuffle order of an epoch depends only on (seed, epoch), so a resumed run
        # replays exactly the order the interrupted one would have used.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        # The loop steps step-wise schedulers itself, once per optimizer step on every process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


def launcher_thread_cap(env: Mapping[str, str], device_type: str, local_processes: int, cores: int) -> Optional[int]:
    """The CPU threads each process should use when `accelerate launch` left PyTorch on one, else None.

    Without `--num_cpu_threads_per_process`, `accelerate launch` exports OMP_NUM_THREADS=1 to a process on a GPU-less
    machine (it raises the value only with an explicit `--cpu`, and its own multi-CPU fix applies only when the
    variable is unset, which it never is after the launcher), so the cold default run featurizes and trains on one
    core. A "1" under the launcher is that default; any other value, or MMGCS_NUM_THREADS, is the user's choice.
    """
    if "MMGCS_NUM_THREADS" in env:
        try:
            return max(1, int(env["MMGCS_NUM_THREADS"]))
        except ValueError:
            raise ConfigError(f"MMGCS_NUM_THREADS: expected a whole number of threads, got {env['MMGCS_NUM_THREADS']!r}") from None
    launched = "ACCELERATE_DYNAMO_BACKEND" in env  # exported by every `accelerate launch` launcher
    if device_type != "cpu" or not launched or env.get("OMP_NUM_THREADS") != "1":
        return None
    threads = max(1, cores // max(1, local_processes))
    return threads if threads > 1 else None


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_available_cores(accelerator) -> None:
    """Undo `accelerate launch`'s one-thread default on CPU (see ``launcher_thread_cap``)."""
    # Processes sharing this machine's cores: torchrun/accelerate export LOCAL_WORLD_SIZE for multi-process jobs.
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes)
    threads = launcher_thread_cap(os.environ, accelerator.device.type, local, _available_cores())
    if threads is not None and threads != torch.get_num_threads():
        logger.info("Using %d CPU threads per process (accelerate launch set OMP_NUM_THREADS=1; "
                    "set MMGCS_NUM_THREADS to choose)", threads)
        torch.set_num_threads(threads)


def reset_accelerate_state() -> None:
    """Let another run start in this process (the sweep, tests); keeps the process group of a launched job."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------- helpers
def _tracker_config(cfg: RunConfig) -> dict:
    # TensorBoard's hparams accept scalars and strings only.
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flatten_dict(config_to_dict(cfg)).items()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is renamed into place only once fully written)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("epoch_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = _checkpoint_dirs(Path(output_dir) / CHECKPOINTS)
    return found[-1] if found else None


def _pipeline_tag(model) -> str:
    # Same rule as the model card: poster-only models are image classifiers, anything reading plots text ones.
    return "image-classification" if getattr(model, "text_tower", None) is None else "text-classification"


def _hub_dataset_id(path: str) -> Optional[str]:
    """The dataset's Hub id for the model card, or None for a local folder."""
    return path if not Path(path).expanduser().exists() and is_hub_id(path) else None


def _diff(a: dict, b: dict) -> list[str]:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _loader_kind(cached: Sequence[str], towers: Sequence[str]) -> str:
    """The ``inputs`` of an epoch in history.json: raw, features, or raw+<modality>_features (mixed)."""
    if not cached:
        return "raw"
    if set(cached) == set(towers):
        return "features"
    return "+".join(["raw", *(f"{m}_features" for m in cached)])


# ------------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig) -> dict:
    """Train, evaluate on the test split and save everything in ``cfg.train.output_dir``; returns metrics.json."""
    validate_config(cfg)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


class Trainer:
    """One run. Kept as an object so each step (data, model, loaders, epochs, finish) is a small method."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.tcfg = cfg.train
        self.out = Path(cfg.train.output_dir)
        self.ckpt_root = self.out / CHECKPOINTS
        self._lock = None
        # Towers frozen for the first `freeze_epochs` and tuned afterwards: parameters that do not train in the
        # first stage must still be known to DDP, which then has to tolerate unused parameters.
        self.final_modes = (self.tcfg.text_finetune, self.tcfg.image_finetune)
        two_stage = self.tcfg.freeze_epochs > 0 and any(m != "frozen" for m in self.final_modes)
        self.accelerator = make_accelerator(cfg, find_unused_parameters=two_stage)
        # Before anything slow (featurizing): the folder is this run's alone and takes writes.
        self._lock = runs.take_run_folder(self.accelerator, self.out, self.out / BUNDLE)
        try:
            self._check_output_dir()
        except TrainingError:
            self._release_lock()
            raise
        self._caller_threads = torch.get_num_threads()
        use_available_cores(self.accelerator)
        self.threads = torch.get_num_threads()
        self.is_main = self.accelerator.is_main_process
        self.history: list[dict] = []
        self.best_metric: Optional[float] = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.global_step = 0
        self.start_epoch = 0
        self._trackers_started = False
        from mmgcs.batching import BadPosterReport

        self.bad_posters = BadPosterReport()

    # --------------------------------------------------------------------------------------------- setup
    def _check_output_dir(self) -> None:
        if self.tcfg.resume:
            return
        previous = runs.checkpoint_dirs(self.ckpt_root)
        if previous:
            raise TrainingError(
                f"{self.out} already holds checkpoints of a run ({previous[0].name}); pass --resume to continue it, "
                "or choose another train.output_dir (or delete that folder)"
            )

    def _check_resumed_config(self) -> None:
        saved = self.out / "config.yaml"
        if not saved.is_file():
            return
        import yaml

        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        new = config_to_dict(self.cfg)
        changed = [k for k in _diff({s: old.get(s, {}) for s in ("data", "model")}, {s: new[s] for s in ("data", "model")})]
        if changed:
            raise TrainingError(
                f"--resume with different data/model settings than the checkpointed run ({', '.join(changed)}); "
                f"resume with the settings saved in {saved}, or start a new run in another train.output_dir"
            )
        ignore = {"train.resume", "train.push_to_hub", "train.epochs", "train.early_stopping_patience", "train.max_steps"}
        changed = [k for k in _diff({"train": old.get("train", {})}, {"train": new["train"]}) if k not in ignore]
        if changed:
            logger.warning("Resuming with changed training settings: %s", ", ".join(changed))

    def load_data(self):
        from mmgcs.batching import label_names, limit_rows
        from mmgcs.data import load_movies

        with self.accelerator.main_process_first():
            try:
                dsd = load_movies(self.cfg.data.path)
            except FileNotFoundError as e:
                raise TrainingError(str(e)) from None
        names = {}
        for role in ("train", "validation", "test"):
            name = getattr(self.cfg.data, f"{role}_split")
            if name not in dsd:
                raise TrainingError(f"data.{role}_split: the dataset has no split {name!r}; its splits are {list(dsd)}")
            names[role] = name
        splits = {role: limit_rows(dsd[name], self.tcfg.limit) for role, name in names.items()}
        for role, split in splits.items():
            if len(split) == 0:
                raise TrainingError(f"The {role} split ({names[role]!r}) of {self.cfg.data.path} is empty")
        self.dataset_labels = label_names(splits["train"])
        return splits

    def build_model(self):
        from mmgcs.models.classifier import GenreClassifier, create_model

        try:
            towers_from = [f"model.{k}" for k in ("init_text_from", "init_image_from") if getattr(self.cfg.model, k)]
            if self.tcfg.init_from and towers_from:
                raise ValueError(f"train.init_from starts from a whole bundle and ignores model.*; unset either it "
                                 f"or {' and '.join(towers_from)}")
            if self.tcfg.init_from:
                model = GenreClassifier.from_pretrained(self.tcfg.init_from)
                logger.info("Starting from the bundle %s (its model settings are used; model.* is ignored)",
                            self.tcfg.init_from)
            else:
                labels = list(self.cfg.model.labels) or list(self.dataset_labels)
                model = create_model(labels=labels, config=self.cfg.model)
                from mmgcs.models.init_from import init_from_config

                init_from_config(model)  # model.init_text_from / init_image_from: towers (+ late heads) from bundles
        except (ValueError, TypeError, OSError) as e:
            # Registries and loaders name the bad setting and the choices; show that, not a traceback.
            source = f"train.init_from={self.tcfg.init_from}" if self.tcfg.init_from else "model settings"
            raise TrainingError(f"Could not build the model from the {source}: {e}") from e
        return model

    def _set_pos_weight(self, model) -> None:
        """Up-weight each genre's positives by sqrt(negatives / positives) in the train split (capped at 10): rare
        genres get a usable gradient without the over-prediction a full ratio causes."""
        from mmgcs.batching import targets

        y = targets(self.splits["train"]["genres"], self.mapping, len(self.labels), self.task)
        pos = y.sum(0).clamp_min(1.0)
        weight = ((len(y) - pos) / pos).clamp_min(1.0).sqrt().clamp_max(10.0)
        model.config.pos_weight = [round(float(w), 4) for w in weight]
        model.pos_weight = torch.tensor(model.config.pos_weight, dtype=torch.float32)
        logger.info("BCE pos_weight per genre: %s", dict(zip(self.labels, model.config.pos_weight)))

    def _apply_stage(self, model, epoch: int) -> bool:
        """Set each tower's fine-tuning mode for ``epoch`` (0-based); True when every tower is frozen."""
        frozen_stage = epoch < self.tcfg.freeze_epochs
        plan = (
            (model.text_tower, self.tcfg.text_finetune, self.tcfg.text_trainable_layers),
            (model.image_tower, self.tcfg.image_finetune, self.tcfg.image_trainable_blocks),
        )
        all_frozen = True
        for tower, mode, n in plan:
            if tower is None:
                continue
            mode = "frozen" if frozen_stage else mode
            tower.set_finetune(mode, n)
            all_frozen &= mode == "frozen"
        return all_frozen

    # ------------------------------------------------------------------------------------------- loaders
    def _prepare_splits(self, splits: dict, model) -> dict:
        from mmgcs.batching import apply_text_template, drop_unusable_rows, label_map, modality_flags, select_inputs

        self.use_text, self.use_image = modality_flags(model)
        self.task = model.config.task
        self.labels = list(model.config.labels)
        try:
            self.mapping = label_map(self.dataset_labels, self.labels)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        out = {}
        for role, split in splits.items():
            if self.use_text:
                try:
                    split = apply_text_template(split, model.config.text_template)
                except ValueError as e:
                    raise TrainingError(str(e)) from None
            split = select_inputs(split, self.use_text, self.use_image)
            split, _ = drop_unusable_rows(split, role, self.use_text, self.use_image, self.mapping, self.task)
            if len(split) == 0:
                raise TrainingError(f"No usable rows in the {role} split for this model (see the warning above)")
            out[role] = split
        return out

    def _fit_lexical(self, model) -> None:
        """Fit the lexical branch (TF-IDF logistic regressions) on the training texts, once, on the main process:
        DDP's start-up broadcast then gives every rank the same weights. Deterministic, so a resumed run refits the
        same weights (which its checkpoint then overwrites anyway); a bundle started from keeps its own fit."""
        from mmgcs.batching import targets

        if model.lexical is None or model.lexical.fitted or not self.is_main:
            return
        train = self.splits["train"]
        start = time.time()
        y = targets(train["genres"], self.mapping, len(self.labels), self.task).numpy()
        summary = model.lexical.fit(train["plot"], y, c=model.config.lexical_c)
        logger.info("Lexical branch fitted in %.1f s on %d texts (%d n-gram buckets kept%s)", time.time() - start,
                    summary["rows"], summary["ngrams_kept"],
                    f"; constant genres: {[self.labels[j] for j in summary['constant_genres']]}"
                    if summary["constant_genres"] else "")

    def _lexical_inputs(self, role: str, model) -> dict:
        """The lexical branch's inputs for a whole split, when its text tower's features come from the cache
        (the raw path gets them from ``model.preprocess``)."""
        if model.lexical is None:
            return {}
        return model.lexical.featurize(self.splits[role]["plot"])

    def _raw_loaders(self, model, features: Optional[dict] = None) -> dict:
        """Loaders of rows through ``model.preprocess``. ``features``: role → {modality: (features, mask)} of the
        frozen towers, read from the cache instead of running those towers on raw inputs every step."""
        from torch.utils.data import DataLoader

        from mmgcs.batching import RowCollator, RowsWithFeatures

        loaders = {}
        for role, split in self.splits.items():
            train = role == "train"
            cached = (features or {}).get(role, {})
            extra = self._lexical_inputs(role, model) if "text" in cached else {}
            collate = RowCollator(model.preprocess, self.mapping, len(self.labels), self.task, train=train,
                                  use_text=self.use_text, use_image=self.use_image, cached=tuple(cached))
            loaders[role] = DataLoader(
                RowsWithFeatures(split, cached, extra) if cached else split,
                batch_size=self.tcfg.batch_size if train else self.tcfg.eval_batch_size,
                shuffle=train,
                collate_fn=collate,
                num_workers=self.cfg.data.num_workers,
                persistent_workers=self.cfg.data.num_workers > 0,
            )
        return loaders

    def _feature_loaders(self, model, features: dict) -> dict:
        """Loaders of cached features only (every tower frozen): no raw input is read at all."""
        from torch.utils.data import DataLoader

        from mmgcs.batching import feature_dataset

        loaders = {}
        for role, split in self.splits.items():
            train = role == "train"
            extra = self._lexical_inputs(role, model) if self.use_text else {}
            ds = feature_dataset(split, features[role], self.mapping, len(self.labels), self.task, extra=extra)
            loaders[role] = DataLoader(
                ds, batch_size=self.tcfg.batch_size if train else self.tcfg.eval_batch_size, shuffle=train
            )
        return loaders

    def _cached_features(self, model, modalities: Sequence[str]) -> Optional[dict]:
        """role → {modality: (features, mask)} from the feature cache (computed once, reused across runs), or None."""
        try:
            from mmgcs.features import FeatureCache
        except ImportError as e:
            logger.warning("Feature cache unavailable (%s): running frozen towers on raw inputs (slower)", e)
            self.tcfg.cache_features = False
            return None
        cache = FeatureCache(self.tcfg.cache_dir)
        model.to(self.accelerator.device)
        features = {}
        # The main process computes and stores the features first; the others then read them from disk.
        # Featurizing (a cache miss) draws random numbers and a hit does not: keep training's RNG out of it, so a
        # run is the same whether its features were cached or not (and a second stage's miss changes nothing).
        with self.accelerator.main_process_first(), torch.random.fork_rng(devices=[]):
            for role, split in self.splits.items():
                features[role] = {
                    m: cache.get_or_compute(
                        model, split, m, batch_size=self.tcfg.eval_batch_size,
                        num_workers=self.cfg.data.num_workers or None,  # 0: the cache picks (one per core)
                    )
                    for m in modalities
                }
        return features

    def _frozen_modalities(self, epoch: int) -> tuple[str, ...]:
        """The towers frozen during ``epoch`` (0-based): all of them in a first frozen stage."""
        towers = (("text", self.use_text, self.final_modes[0]), ("image", self.use_image, self.final_modes[1]))
        return tuple(m for m, on, mode in towers if on and (epoch < self.tcfg.freeze_epochs or mode == "frozen"))

    def _loaders_for(self, epoch: int) -> dict:
        """Prepared loaders for the stage ``epoch`` belongs to: frozen towers' features come from the cache
        ("features" when every tower is frozen, e.g. "raw+text_features" when only the image tower trains)."""
        towers = tuple(m for m, on in (("text", self.use_text), ("image", self.use_image)) if on)
        cached = self._frozen_modalities(epoch) if self.tcfg.cache_features else ()
        kind = _loader_kind(cached, towers)
        if kind not in self._prepared:
            unwrapped = self.accelerator.unwrap_model(self.model)
            features = self._cached_features(unwrapped, cached) if cached else None
            if features is None:
                kind = "raw"
            if kind not in self._prepared:
                if kind == "features":
                    loaders = self._feature_loaders(unwrapped, features)
                else:
                    loaders = self._raw_loaders(unwrapped, features)
                self._prepared[kind] = {role: self.accelerator.prepare(dl) for role, dl in loaders.items()}
        self.loader_kind = kind
        self._use_threads(kind)
        return self._prepared[kind]

    def _use_threads(self, kind: str) -> None:
        """One CPU thread while only the head runs on cached features, else the run's threads. The head's ops are
        tiny: while another process used the cores, an epoch of the default head took 2.9 s on one thread, 3.5 s on
        two with OMP_WAIT_POLICY=PASSIVE and 244 s on two spinning ones (OpenMP workers wait out each other's time
        slices at every op). MMGCS_NUM_THREADS overrides."""
        if self.accelerator.device.type != "cpu" or "MMGCS_NUM_THREADS" in os.environ:
            return
        want = 1 if kind == "features" else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    # ------------------------------------------------------------------------------------------ training
    def fit(self) -> dict:
        from accelerate.utils import set_seed

        from mmgcs.optim import build_optimizer, build_schedule

        acc = self.accelerator
        t_start = time.time()
        if self.tcfg.resume:
            self._check_resumed_config()
        # Verified before anything reads the weights (the cached features are computed from them below).
        self._resume_from = runs.pick_checkpoint(acc, self.ckpt_root, self.out) if self.tcfg.resume else None
        splits = self.load_data()
        set_seed(self.tcfg.seed)  # before the model is built: the same initial head on every run and rank
        model = self.build_model()
        self.splits = self._prepare_splits(splits, model)
        self._fit_lexical(model)
        if self.tcfg.pos_weight != "none" and self.task == "multilabel":
            self._set_pos_weight(model)
        logger.info(
            "Data %s: %s rows; %d genres; towers: %s",
            self.cfg.data.path,
            {r: len(s) for r, s in self.splits.items()},
            len(self.labels),
            ", ".join(n for n, on in (("text", self.use_text), ("image", self.use_image)) if on),
        )

        # Optimizer and DDP wrapper over what trains in the final stage (DDP only syncs the parameters that need
        # grads when it is built); a first frozen stage then leaves the towers without grads.
        self._apply_stage(model, self.tcfg.epochs)
        optimizer = build_optimizer(model, self.tcfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self._apply_stage(acc.unwrap_model(self.model), 0)
        self._prepared: dict = {}
        loaders = self._loaders_for(0)
        steps_per_epoch = math.ceil(len(loaders["train"]) / self.tcfg.grad_accum_steps)
        self.metric_mode = "min" if self.tcfg.metric_for_best == "loss" else "max"
        self.schedule = build_schedule(self.optimizer.optimizer, self.tcfg, steps_per_epoch, self.metric_mode)
        if self.schedule.scheduler is not None:
            self.schedule.scheduler = acc.prepare(self.schedule.scheduler)

        # Training starts from the seed's RNG state, whatever building the model and the loaders drew (featurizing
        # runs under its own RNG, see _cached_features). A resumed run then restores the checkpoint's RNG states.
        set_seed(self.tcfg.seed)
        if self.tcfg.resume:
            self._resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.mark_incomplete(self.out)
            save_config(self.cfg, self.out / "config.yaml")
        self._start_trackers()

        stop = False
        for epoch in range(self.start_epoch, self.tcfg.epochs):
            t_epoch = time.time()
            self._apply_stage(acc.unwrap_model(self.model), epoch)
            loaders = self._loaders_for(epoch)
            train_loss, steps_done = self._train_epoch(loaders["train"], epoch)
            val = self._evaluate(loaders["validation"])
            record = {
                "epoch": epoch + 1,
                "step": self.global_step,
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val["summary"].items()},
                "lr": self._lrs(),
                "inputs": self.loader_kind,
                "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "time_s": round(time.time() - t_epoch, 2),
            }
            if acc.num_processes > 1:
                record["processes"] = acc.num_processes
                record["replicas_in_sync"] = self._check_replicas()
            self.history.append(record)
            improved = self._track_best(val["summary"], epoch + 1)
            self._step_epoch_schedule(val["summary"])
            if improved:
                self._save_bundle(self.out / BUNDLE, thresholds=val["thresholds"])
            self._save_checkpoint(epoch + 1)
            logger.info(
                "epoch %d/%d: train_loss %.4f val_loss %.4f val_%s %.4f%s (%.0f s, %s)",
                epoch + 1, self.tcfg.epochs, train_loss, val["summary"]["loss"], self.tcfg.metric_for_best,
                val["summary"][self.tcfg.metric_for_best], " *best*" if improved else "", record["time_s"],
                self.loader_kind,
            )
            if self._trackers_started:
                acc.log({k: v for k, v in flatten_dict(record).items() if isinstance(v, (int, float))}, step=self.global_step)
            if self.tcfg.max_steps and self.global_step >= self.tcfg.max_steps:
                logger.info("Reached train.max_steps=%d", self.tcfg.max_steps)
                stop = True
            if self.tcfg.early_stopping_patience and self.bad_epochs >= self.tcfg.early_stopping_patience:
                logger.info("Early stopping: no %s improvement for %d epochs", self.tcfg.metric_for_best, self.bad_epochs)
                stop = True
            if stop:
                break
        train_time = time.time() - t_start
        return self._finish(train_time)

    def _train_epoch(self, loader, epoch: int) -> tuple[float, int]:
        from tqdm.auto import tqdm

        acc = self.accelerator
        self.model.train()
        loader.set_epoch(epoch)
        total, count, steps = torch.zeros((), device=acc.device), 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.tcfg.epochs}", disable=not acc.is_local_main_process,
                   dynamic_ncols=True, leave=False)
        for batch in bar:
            batch = self.bad_posters.take(batch)
            with acc.accumulate(self.model):
                outputs = self.model(**batch)
                loss = outputs["loss"]
                acc.backward(loss)
                if acc.sync_gradients and self.tcfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), self.tcfg.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients and self.schedule.interval == "step" and not acc.optimizer_step_was_skipped:
                    self.schedule.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
            count += 1
            if acc.sync_gradients:
                self.global_step += 1
                steps += 1
                if self.global_step % self.tcfg.log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                    if self._trackers_started:
                        acc.log({"train/loss": loss.item(), **{f"train/{k}": v for k, v in self._lrs().items()}},
                                step=self.global_step)
                if self.tcfg.max_steps and self.global_step >= self.tcfg.max_steps:
                    break
        mean = acc.reduce(total / max(count, 1), reduction="mean")
        return float(mean.item()), steps

    def _lrs(self) -> dict:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    @torch.no_grad()
    def _predict(self, loader, hide: Optional[str] = None) -> dict[str, np.ndarray]:
        """Gathered probabilities, targets and input masks of exactly the rows of ``loader``'s split, on every
        process (gather_for_metrics drops the padding DDP adds to even out the last batch).

        ``hide``: a modality to mask out of every row (what the model predicts without it).
        """
        acc = self.accelerator
        model = self.model
        unwrapped = acc.unwrap_model(model)
        model.eval()
        probs, all_logits, labels, masks = [], [], [], {m: [] for m in MODALITIES}
        for batch in loader:
            batch = self.bad_posters.take(batch)
            if hide is not None:
                batch[f"{hide}_mask"] = torch.zeros_like(batch[f"{hide}_mask"])
            target = batch.pop("labels")
            logits = model(**batch)["logits"].float()
            present = {m: batch[f"{m}_mask"] for m in MODALITIES if f"{m}_mask" in batch}
            logits, target, present = acc.gather_for_metrics((logits, target, present))
            probs.append(unwrapped.probabilities(logits).cpu())
            all_logits.append(logits.cpu())
            labels.append(target.cpu())
            for m, v in present.items():
                masks[m].append(v.cpu())
        y = torch.cat(labels)
        if self.task == "singlelabel":
            y = torch.nn.functional.one_hot(y.clamp_min(0), len(self.labels)).float()
        out = {"probs": torch.cat(probs).numpy(), "logits": torch.cat(all_logits).numpy(), "labels": y.numpy()}
        for m, parts in masks.items():
            if parts:
                out[f"has_{m}"] = torch.cat(parts).numpy()
        return out

    def _score(self, pred: dict, thresholds) -> dict:
        from mmgcs.metrics import compute_metrics

        return compute_metrics(
            pred["probs"], pred["labels"], self.labels, thresholds=thresholds, argmax=self.task == "singlelabel"
        )

    def _tune(self, pred: dict) -> Optional[list[float]]:
        from mmgcs.metrics import tune_thresholds

        if not self.tcfg.tune_thresholds or self.task == "singlelabel":
            return None
        default = float(self.accelerator.unwrap_model(self.model).config.threshold)
        thr = tune_thresholds(pred["probs"], pred["labels"], min_positives=self.tcfg.threshold_min_positives, default=default)
        return [float(t) for t in thr]

    def _evaluate(self, loader) -> dict:
        """Validation: metrics computed once, on the main process, then shared so every rank decides alike."""
        from accelerate.utils import broadcast_object_list

        pred = self._predict(loader)
        result = [None]
        if self.is_main:
            thresholds = self._tune(pred)
            metrics = self._score(pred, thresholds if thresholds is not None else self._default_threshold())
            metrics["loss"] = self._loss(pred)
            summary = {k: metrics[k] for k in ("loss", "micro_f1", "macro_f1", "weighted_f1", "samples_f1", "mAP", "n_samples")}
            result = [{"summary": summary, "thresholds": thresholds}]
        broadcast_object_list(result)
        return result[0]

    def _tune_lexical_weight(self, loader) -> tuple[Optional[dict], Optional[dict]]:
        """Choose ``lexical_weight`` on the validation split: the fused logits F and the lexical ones X are read off
        two predictions (weight 0 and 1; logits are linear in the weight), then each weight of the grid is scored
        by validation micro-F1 under its own tuned thresholds. Every process computes the same choice from the
        same gathered predictions. Returns (summary, the validation prediction at the chosen weight when one of
        the two passes made it, else None)."""
        from mmgcs.metrics import compute_metrics

        config = self.accelerator.unwrap_model(self.model).config
        if not config.lexical:
            return None, None
        config.lexical_weight = 0.0
        fused = self._predict(loader)
        config.lexical_weight = 1.0
        full = self._predict(loader)
        lexical = full["logits"] - fused["logits"]
        scores = {}
        for weight in LEXICAL_WEIGHTS:
            pred = dict(fused, probs=1.0 / (1.0 + np.exp(-(fused["logits"] + weight * lexical))))
            thresholds = self._tune(pred)
            scores[weight] = compute_metrics(pred["probs"], pred["labels"], self.labels,
                                             thresholds=thresholds if thresholds is not None else config.threshold)["micro_f1"]
        best = max(scores, key=lambda w: (round(scores[w], 6), -w))  # ties: the smaller weight
        config.lexical_weight = float(best)
        logger.info("Lexical weight %.2f (validation micro-F1 %.4f; without the lexical branch %.4f)",
                    best, scores[best], scores[0.0])
        summary = {"weight": float(best), "val_micro_f1_by_weight": {str(w): round(v, 4) for w, v in scores.items()}}
        return summary, {0.0: fused, 1.0: full}.get(best)

    def _default_threshold(self) -> float:
        return float(self.accelerator.unwrap_model(self.model).config.threshold)

    def _loss(self, pred: dict) -> float:
        # Plain (unweighted) BCE / CE over exactly the gathered rows: comparable across epochs and runs.
        p = torch.from_numpy(pred["probs"]).double().clamp(1e-7, 1 - 1e-7)
        y = torch.from_numpy(pred["labels"]).double()
        if self.task == "singlelabel":
            return float(-(y * p.log()).sum(1).mean())
        return float(torch.nn.functional.binary_cross_entropy(p, y))

    def _check_replicas(self) -> bool:
        """Every process must hold the same weights after an epoch; a launch that silently trains independent
        copies (e.g. `--multi_gpu` without a GPU and without cpu=True) is stopped here rather than reported."""
        from accelerate.utils import gather_object

        digest = hashlib.sha256()
        for name, tensor in sorted(self.accelerator.unwrap_model(self.model).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = gather_object([digest.hexdigest()])
        if len(set(digests)) != 1:
            raise TrainingError(
                f"The {len(digests)} processes hold different weights after an epoch: they are not training one "
                "model together. Launch with `accelerate launch --multi_gpu` on GPUs, or let MMGCS force the CPU "
                "backend (it does when no GPU is visible)"
            )
        return True

    def _track_best(self, summary: dict, epoch: int) -> bool:
        value = summary[self.tcfg.metric_for_best]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = -math.inf if self.metric_mode == "max" else math.inf
        better = (
            self.best_metric is None
            or (value > self.best_metric if self.metric_mode == "max" else value < self.best_metric)
        )
        if better:
            self.best_metric, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def _step_epoch_schedule(self, summary: dict) -> None:
        if self.schedule.interval == "epoch":
            self.schedule.scheduler.step()
        elif self.schedule.interval == "metric":
            self.schedule.scheduler.step(summary[self.tcfg.metric_for_best])

    # ------------------------------------------------------------------------------------ save / resume
    def _save_bundle(self, folder: Path, thresholds: Optional[list[float]] = None) -> None:
        """Write the unwrapped model (no DDP `module.` prefix) as a Hub bundle, replacing ``folder`` atomically."""
        acc = self.accelerator
        acc.wait_for_everyone()
        runs.collective(acc, lambda: self._write_bundle(folder, thresholds) if self.is_main else None,
                        runs.save_failed("the best model", folder))

    def _write_bundle(self, folder: Path, thresholds: Optional[list[float]]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        previous = model.config.thresholds
        model.config.thresholds = thresholds
        try:
            runs.replace_folder(folder, model.save_pretrained)
        finally:
            model.config.thresholds = previous

    def _trainer_state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "epochs": self.tcfg.epochs,  # the run's plan: a checkpoint past it is refused on resume
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "metric_for_best": self.tcfg.metric_for_best,
            "history": self.history,
        }

    def _save_checkpoint(self, epoch: int) -> None:
        acc = self.accelerator
        final = self.ckpt_root / f"epoch_{epoch:03d}"
        tmp = self.ckpt_root / f".tmp-epoch_{epoch:03d}"
        failed = runs.save_failed(f"the checkpoint of epoch {epoch}", self.ckpt_root)

        def start() -> None:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        # Each step is collective (a barrier), and a failed write stops every process with the same error.
        runs.collective(acc, start, failed)
        # model (safetensors), optimizer, scheduler, every rank's RNG states
        runs.collective(acc, lambda: acc.save_state(str(tmp)), failed)
        runs.collective(acc, lambda: self._publish_checkpoint(tmp, final, epoch) if self.is_main else None, failed)

    def _publish_checkpoint(self, tmp: Path, final: Path, epoch: int) -> None:
        # Our own state is JSON, not a pickled "custom object"; the digests of every file are written last.
        _write_json(tmp / STATE_FILE, self._trainer_state(epoch))
        runs.write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint folder exists only once it is complete
        _write_json(self.out / "history.json", self.history)
        keep = {final.name, f"epoch_{self.best_epoch:03d}"}
        for old in runs.checkpoint_dirs(self.ckpt_root):  # damaged leftovers too
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        ckpt = self._resume_from  # verified in fit (runs.pick_checkpoint)
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", self.ckpt_root)
            return
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        self._apply_stage(self.accelerator.unwrap_model(self.model), state["epoch"])
        self.accelerator.load_state(str(ckpt))
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_metric = state["best_metric"]
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = list(state["history"])
        logger.info("Resumed from %s (epoch %d done, best %s at epoch %d)", ckpt, self.start_epoch,
                    self.best_metric, self.best_epoch)
        if self.start_epoch >= self.tcfg.epochs:
            logger.info("The checkpointed run already finished its %d epochs; re-evaluating the best model", self.tcfg.epochs)
        if self.tcfg.early_stopping_patience and self.bad_epochs >= self.tcfg.early_stopping_patience:
            self.start_epoch = self.tcfg.epochs  # it had stopped early

    def _start_trackers(self) -> None:
        if self.accelerator.log_with:
            self.accelerator.init_trackers(self.out.name or "mmgcs", config=_tracker_config(self.cfg))
            self._trackers_started = True

    # ------------------------------------------------------------------------------------------- finish
    def _load_best(self) -> None:
        from safetensors.torch import load_file

        weights = self.out / BUNDLE / "model.safetensors"
        if not weights.is_file():
            raise TrainingError(f"The best model bundle {weights} is missing; the run cannot be finished")
        # Loaded on the CPU and copied into place: the model keeps its device (a DDP CPU run reports "cpu:0").
        self.accelerator.unwrap_model(self.model).load_state_dict(load_file(str(weights)), strict=True)

    def _finish(self, train_time: float) -> dict:
        acc = self.accelerator
        acc.wait_for_everyone()
        self._load_best()
        # The inputs of the last epoch run: its cached towers were frozen up to then, so their features hold for
        # the best model (a resumed finished run has only built the first stage's loaders so far).
        loaders = self._loaders_for(max(len(self.history) - 1, 0))
        lexical, val_pred = self._tune_lexical_weight(loaders["validation"])
        if val_pred is None:
            val_pred = self._predict(loaders["validation"])
        test_pred = self._predict(loaders["test"])
        both = self.use_text and self.use_image
        hidden = {m: self._predict(loaders["test"], hide=m) for m in MODALITIES} if both else {}
        result: list[Any] = [None]
        saved = None
        if self.is_main:
            thresholds = self._tune(val_pred)
            thr = thresholds if thresholds is not None else self._default_threshold()
            metrics = {
                "test": self._score(test_pred, thr),
                "validation": self._score(val_pred, thr),
                "best_epoch": self.best_epoch,
                f"best_val_{self.tcfg.metric_for_best}": self.best_metric,
                "epochs_run": len(self.history),
                "train_time_s": round(train_time, 1),
                "thresholds": dict(zip(self.labels, thresholds)) if thresholds is not None else None,
                "labels": self.labels,
                "rows": {role: len(s) for role, s in self.splits.items()},
                "dataset": self.cfg.data.path,
            }
            if lexical is not None:
                metrics["lexical"] = lexical
            if both:
                # What the fused model does when a movie has only a plot / only a poster: scored on the test rows
                # that have that input, with the other one hidden.
                other = {"text": "image", "image": "text"}
                metrics["test_single_input"] = {}
                for m in MODALITIES:
                    rows = test_pred.get(f"has_{m}")
                    pred = hidden[other[m]]
                    if rows is None or not rows.any():
                        continue
                    sub = {"probs": pred["probs"][rows], "labels": pred["labels"][rows]}
                    metrics["test_single_input"][f"{m}_only"] = self._score(sub, thr)
            saved = (metrics, thresholds, test_pred, hidden)
            result = [metrics]
        runs.collective(acc, lambda: self._save_outputs(*saved) if saved else None,
                        runs.save_failed("the final model and metrics", self.out))
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(result)
        acc.wait_for_everyone()
        if self.tcfg.push_to_hub:
            self._push()
        return result[0]

    def _save_outputs(self, metrics: dict, thresholds, test_pred: dict, hidden: dict) -> None:
        from mmgcs.report import fill_model_card, write_run_report

        model = self.accelerator.unwrap_model(self.model)
        model.config.thresholds = thresholds
        bundle = self.out / BUNDLE
        dataset = _hub_dataset_id(self.cfg.data.path) or Path(self.cfg.data.path).expanduser().resolve().name

        def write(tmp: Path) -> None:
            # The best weights with the thresholds tuned on validation, and the card's model-index filled.
            model.save_pretrained(tmp)
            fill_model_card(
                tmp, metrics["test"], model_name=f"mmgcs-{self.out.resolve().name}", dataset_name=dataset,
                dataset_type=dataset, task_type=_pipeline_tag(model),
            )

        runs.replace_folder(bundle, write)  # recoverable from a kill at any step (see mmgcs.runs)
        _write_json(self.out / "metrics.json", metrics)
        _write_json(self.out / "history.json", self.history)
        arrays = {"probs": test_pred["probs"], "labels": test_pred["labels"]}
        for key in ("has_text", "has_image"):
            if key in test_pred:
                arrays[key] = test_pred[key]
        for m, pred in hidden.items():
            arrays[f"probs_without_{m}"] = pred["probs"]
        if "id" in self.splits["test"].column_names:
            arrays["ids"] = np.asarray(self.splits["test"]["id"])
        np.savez_compressed(self.out / "test_predictions.npz", **arrays)
        try:
            write_run_report(self.out, self.history, metrics["test"], self.labels)
        except Exception as e:  # plots are a convenience; never lose a finished run over them
            logger.warning("Could not write the run report plots: %s", e)
        logger.info(
            "Test: micro-F1 %.4f macro-F1 %.4f mAP %.4f (best epoch %d); saved in %s",
            metrics["test"]["micro_f1"], metrics["test"]["macro_f1"], metrics["test"]["mAP"] or float("nan"),
            self.best_epoch, self.out,
        )
        runs.mark_complete(self.out, {"best_epoch": self.best_epoch, "metrics": "metrics.json", "model": BUNDLE})

    def _push(self) -> None:
        repo_id = self.tcfg.push_to_hub
        if not self.is_main:
            return
        try:
            from mmgcs.hub import push_bundle

            url = push_bundle(self.out / BUNDLE, repo_id)
        except Exception as e:
            raise PushError(
                f"Could not push {self.out / BUNDLE} to the Hub repo {repo_id!r}: {type(e).__name__}: {e}. "
                f"Everything is saved in {self.out}; push it later with "
                f"`huggingface-cli upload {repo_id} {self.out / BUNDLE} .` once the Hub is reachable and you are logged in"
            ) from None
        logger.info("Pushed the bundle to %s", url)

    def close(self) -> None:
        try:
            if getattr(self, "_trackers_started", False):
                self.accelerator.end_training()
        finally:
            self._release_lock()
        if getattr(self, "_caller_threads", None):
            torch.set_num_threads(self._caller_threads)  # a run inside a notebook or a test leaves its threads as found
        reset_accelerate_state()

    def _release_lock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()


__all__ = ["PushError", "Trainer", "TrainingError", "latest_checkpoint", "main", "resolve_mixed_precision", "run"]
