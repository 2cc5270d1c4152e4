"""Config precedence (defaults < YAML < --fast < key=value), coercion and errors that name the field."""

import pytest
import yaml

from mmgcs.config import (
    ConfigError,
    RunConfig,
    load_config,
    parse_overrides,
    save_config,
    validate_config,
)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_when_nothing_given():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.data.path == "data/movies"
    assert cfg.train.optimizer == "adamw"


def test_precedence_defaults_yaml_cli(tmp_path):
    first = write_yaml(tmp_path / "a.yaml", {"train": {"epochs": 7, "lr": 0.01, "seed": 1}})
    second = write_yaml(tmp_path / "b.yaml", {"train": {"lr": "3e-4"}, "data": {"path": "x/y"}})
    cfg = load_config([first, second], ["train.seed=5", "data.path=DIR"])
    assert cfg.train.epochs == 7  # only in the first file
    assert cfg.train.lr == pytest.approx(3e-4)  # second file wins over the first; "3e-4" string coerced
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.seed == 5  # command line wins over the file
    assert cfg.data.path == "DIR"
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched default


def test_documented_override_keys(tmp_path):
    cfg = load_config(
        overrides=["data.path=user/movies", f"train.output_dir={tmp_path}", "train.epochs=4", "train.seed=123"]
    )
    assert (cfg.data.path, cfg.train.output_dir, cfg.train.epochs, cfg.train.seed) == (
        "user/movies",
        str(tmp_path),
        4,
        123,
    )


def test_fast_profile_below_explicit_overrides(tmp_path):
    f = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 9, "limit": 0}})
    fast = load_config([f], fast=True)
    assert fast.train.limit > 0 and fast.train.epochs < 9
    explicit = load_config([f], ["train.epochs=3"], fast=True)
    assert explicit.train.epochs == 3 and explicit.train.limit == fast.train.limit


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=3", 3),
        ("train.cache_features=false", False),
        ("train.cache_features=True", True),
        ("train.weight_decay=1e-5", 1e-5),
        ("model.labels=Drama,Comedy", ["Drama", "Comedy"]),
        ("model.labels=[Drama, Comedy]", ["Drama", "Comedy"]),
        ("model.pos_weight=none", None),
    ],
)
def test_values_are_coerced_to_the_field_type(override, expected):
    cfg = load_config(overrides=[override])
    section, key = override.split("=")[0].split(".")
    assert getattr(getattr(cfg, section), key) == expected


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.epoch=3", ["train.epoch", "did you mean train.epochs", "valid keys"]),
        ("trian.epochs=3", ["trian", "data", "model", "train"]),
        ("train.lr=abc", ["train.lr", "float", "abc"]),
        ("train.epochs=2.5", ["train.epochs", "int"]),
        ("train.cache_features=maybe", ["train.cache_features", "true/false"]),
        ("train.optimizer=lion", ["train.optimizer", "lion", "adamw", "adam", "sgd"]),
        ("train.scheduler=linear", ["train.scheduler", "cosine", "step", "plateau", "none"]),
        ("train.image_finetune=half", ["train.image_finetune", "frozen", "partial", "full"]),
        ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16", "fp16"]),
        ("train.metric_for_best=accuracy", ["train.metric_for_best", "micro_f1", "mAP"]),
        ("model.task=regression", ["model.task", "multilabel", "singlelabel"]),
        ("train.epochs=0", ["train.epochs", ">= 1"]),
        ("train.lr=0", ["train.lr", "> 0"]),
        ("train.batch_size=-4", ["train.batch_size"]),
        ("train.warmup_ratio=1.5", ["train.warmup_ratio", "< 1"]),
        ("train.freeze_epochs=10", ["train.freeze_epochs", "train.epochs"]),
        ("train", ["section.key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_field_and_choices(override, must_mention):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for text in must_mention:
        assert text in str(err.value), (text, str(err.value))


def test_bad_value_in_yaml_is_reported_with_its_field(tmp_path):
    f = write_yaml(tmp_path / "bad.yaml", {"train": {"optimizer": "rmsprop"}})
    with pytest.raises(ConfigError, match=r"train\.optimizer.*rmsprop"):
        load_config([f])
    # ...but a later override may repair it: values are validated once everything is merged.
    assert load_config([f], ["train.optimizer=sgd"]).train.optimizer == "sgd"


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([broken])
    listy = write_yaml(tmp_path / "list.yaml", [1, 2])
    with pytest.raises(ConfigError, match="mapping"):
        load_config([listy])
    unknown = write_yaml(tmp_path / "unknown.yaml", {"train": {"epochz": 1}})
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config([unknown])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.epochs"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["train.lr=3e-4", "model.labels=Drama,Comedy", "data.path=here"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config([tmp_path / "config.yaml"])
    assert again == cfg


def test_validate_config_catches_programmatic_mistakes():
    cfg = RunConfig()
    cfg.train.scheduler = "onecycle"
    with pytest.raises(ConfigError, match="train.scheduler"):
        validate_config(cfg)


def test_config_imports_no_model_code():
    import subprocess
    import sys

    # mmgcs.lazy is the package __init__'s lazy re-export helper (standard library only), not model code.
    code = ("import sys, mmgcs.config; bad = sorted(m for m in sys.modules if m.startswith('mmgcs.') "
            "and m not in ('mmgcs.config', 'mmgcs.lazy') or m in ('torch', 'timm', 'transformers')); print(bad)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_each_choice_list_is_the_one_its_implementation_uses():
    from mmgcs.config import CHOICES
    from mmgcs.models.config_checks import TASKS
    from mmgcs.models.tower import FINETUNE_MODES
    from mmgcs.optim import OPTIMIZERS, SCHEDULERS

    assert set(CHOICES["train.optimizer"]) == set(OPTIMIZERS)
    assert set(CHOICES["train.scheduler"]) == set(SCHEDULERS)
    assert tuple(CHOICES["train.text_finetune"]) == tuple(CHOICES["train.image_finetune"]) == tuple(FINETUNE_MODES)
    assert tuple(CHOICES["model.task"]) == tuple(TASKS)


def test_the_defaults_have_one_home():
    from mmgcs.config import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE, ModelConfig
    from mmgcs.models import embedded

    assert (ModelConfig().text_backbone, ModelConfig().image_backbone) == (DEFAULT_TEXT_BACKBONE, DEFAULT_IMAGE_BACKBONE)
    assert embedded.DEFAULT_TEXT_BACKBONE is DEFAULT_TEXT_BACKBONE  # the embedded copies' module names the same ones


@pytest.mark.parametrize(
    "template, message",
    [
        ("{title}", "must contain {plot}"),
        ("{plot} {year}", "unknown fields ['year']"),
        ("{plot", "not a valid format string"),
    ],
)
def test_the_text_template_is_checked_with_the_config(template, message):
    from mmgcs.config import check_text_template
    from mmgcs.models import preprocessing

    with pytest.raises(ConfigError, match=r"model\.text_template") as err:
        load_config(overrides=[f"model.text_template={template}"])
    assert message in str(err.value)
    assert preprocessing.check_text_template is check_text_template  # its old import path still works
    assert load_config(overrides=["model.text_template={title}. {plot}"]).model.text_template == "{title}. {plot}"
