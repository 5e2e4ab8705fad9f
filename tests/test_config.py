"""Config schema, strict checking with exact messages, key=value overrides and the YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffkd.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
)
from diffkd.config.schema import CONFIG_FORMAT

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "fashion_mnist").glob("*.yaml"))


def check(data: dict, *overrides: str) -> Config:
    """config_from_dict after overrides."""
    return config_from_dict(apply_overrides(data, overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_fashion_mnist_configs_exist() -> None:
    names = {p.name for p in CONFIGS if p.parent.name == "fashion_mnist"}
    assert {"teacher.yaml", "student.yaml", "kd.yaml", "diffkd.yaml"} <= names


def test_full_config_round_trip(tmp_path: Path) -> None:
    data = {
        "teacher": {"name": "fmnist_teacher", "checkpoint": "runs/t", "sha256": "ab" * 32},
        "student": {"name": "fmnist_student", "num_classes": 10},
        "levels": [
            {"student": "@feature", "teacher": "@feature", "method": "diffkd", "options": {"distance": "mse"}},
            {"student": "fc", "teacher": "fc", "method": "kd", "weight": 0.5, "name": "logits", "options": {"tau": 4}},
            {"student": {"path": "features", "capture": "input"}, "teacher": "features", "method": "mse"},
        ],
        "data": {"name": "imagenet", "image_size": 160, "randaugment": True, "random_erasing": 0.25, "cutmix": 1.0},
        "optim": {"name": "rmsprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-3},
        "schedule": {"name": "exponential", "gamma": 0.97, "every_epochs": 2.4, "warmup_epochs": 3},
        "train": {"amp": "bf16", "ema_decay": 0.9999, "clip_grad_norm": 5, "label_smoothing": 0.1},
    }
    cfg = config_from_dict(data)
    assert cfg.schedule.warmup_epochs == 3.0 and isinstance(cfg.schedule.warmup_epochs, float)  # int widened
    assert cfg.levels[1].options == {"tau": 4}
    assert cfg.levels[2].student == {"path": "features", "capture": "input"}  # a Tap mapping
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_a_level_side_may_list_several_taps_and_aliases_resolve_in_lists() -> None:
    from diffkd import models
    from diffkd.models.probe import ProbeError, resolve_alias

    cfg = check({"levels": [{"student": ["features.1", "@feature"], "teacher": ["features.1", {"path": "features"}],
                             "method": "reviewkd"}]})
    assert cfg.levels[0].student == ["features.1", "@feature"]
    taps = lambda: models.default_taps("fmnist_student")  # noqa: E731
    assert resolve_alias(cfg.levels[0].student, "levels.0.student", taps) == ["features.1", "features"]
    with pytest.raises(ProbeError, match=r"^levels\.0\.student\.1: unknown tap alias '@feat'; use @feature, @logits"):
        resolve_alias(["features.1", "@feat"], "levels.0.student", taps)
    with pytest.raises(ConfigError, match=r"^levels\.0\.student: expected a string \(str\) or an integer \(int\) or a mapping"):
        check({"levels": [{"student": True, "teacher": "fc", "method": "kd"}]})  # an integer is a path (issue 22), a bool not


def test_yaml_1_2_exponent_floats_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  eps: 2E-8\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 2e-8


def test_unknown_key_names_the_valid_keys_and_closest_match() -> None:
    with pytest.raises(ConfigError) as err:
        check({"optim": {"lrr": 0.1}})
    assert str(err.value) == (
        "unknown key 'optim.lrr'. Did you mean 'optim.lr'? Valid keys in optim: "
        "name, lr, momentum, nesterov, weight_decay, no_decay_norm_bias, eps, alpha, betas, methods_lr_scale"
    )


def test_configs_carry_a_format_and_another_is_one_line() -> None:
    assert config_to_dict(check({}))["format"] == CONFIG_FORMAT  # every saved config says its format
    with pytest.raises(ConfigError, match=rf"^format: this config is of format 0, and this diffkd reads format {CONFIG_FORMAT};"):
        check({"format": 0})


def test_unknown_top_level_and_list_item_keys() -> None:
    with pytest.raises(ConfigError, match=r"^unknown key 'trian'\. Did you mean 'train'\? Valid keys: format, task, data,"):
        check({"trian": {}})
    level = {"student": "a", "teacher": "b", "method": "kd", "wieght": 2}
    with pytest.raises(ConfigError, match=r"^unknown key 'levels\.0\.wieght'\. Did you mean 'levels\.0\.weight'\?"):
        check({"levels": [level]})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number (float), got 'fast' (str)"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer (int), got 2.5 (float)"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer (int), got True (bool)"),
        ({"train": {"compile": "yes please"}}, "train.compile: expected true or false (bool), got 'yes please' (str)"),
        ({"data": {"limit_train": "all"}}, "data.limit_train: expected an integer (int) or null, got 'all' (str)"),
        (
            {"schedule": {"milestones": 30}},
            "schedule.milestones: expected a list (items: a number (float)), got 30 (int)",
        ),
        ({"schedule": {"milestones": [30, "x"]}}, "schedule.milestones.1: expected a number (float), got 'x' (str)"),
        (
            {"train": {"amp": "bf61"}},
            "train.amp: expected one of 'none', 'bf16', 'fp16', got 'bf61' (str). Did you mean 'bf16'?",
        ),
        ({"data": []}, "data: expected a mapping, got [] (list)"),
        ({"model": {}}, "model.name: missing (required, a string (str))"),
        ({"train": {"epochs": 0}}, "train.epochs: must be at least 1, got 0"),
        ({"train": {"device": "gpu"}}, "train.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ],
)
def test_wrong_values_name_the_key_and_the_expected_type(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(data)
    assert str(err.value) == message


def test_overrides_dotted_keys_lists_and_yaml_values() -> None:
    base = {"levels": [{"student": "@feature", "teacher": "@feature", "method": "mse"}]}
    cfg = check(
        base,
        "optim.lr=0.05",
        "schedule.milestones=[1, 2.5]",
        "levels.0.weight=2",
        "levels.0.options.tau=4",
        "model.name=fmnist_student",  # a section absent from the file
        "data.root=null",
        "train.compile=true",
    )
    assert cfg.optim.lr == 0.05
    assert cfg.schedule.milestones == [1.0, 2.5]
    assert cfg.levels[0].weight == 2.0 and cfg.levels[0].options == {"tau": 4}
    assert cfg.model is not None and cfg.model.name == "fmnist_student"
    assert cfg.data.root is None and cfg.train.compile is True


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match=r"^override 'optim\.lr': expected key=value"):
        check({}, "optim.lr")
    with pytest.raises(ConfigError, match=r"^override 'levels\.3\.weight': 'levels\.3' needs an index below 0"):
        check({"levels": []}, "levels.3.weight=1")
    with pytest.raises(ConfigError, match=r"^unknown key 'optim\.learning_rate'"):
        check({}, "optim.learning_rate=0.1")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_yaml_never_executes_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("optim: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_other_tasks_sections_are_left_out_of_dumps_at_defaults() -> None:
    assert "detection:" not in dump_config(Config()) and "segmentation:" not in dump_config(Config())
    cfg = check({"task": "detection", "detection": {"mosaics": {"canvas": 64}}, "segmentation": {"flip": False}})
    text = dump_config(cfg)
    assert "detection:" in text and "segmentation:" in text  # the run's task, and a changed section
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_dump_is_in_schema_order() -> None:
    text = dump_config(Config())
    top = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "-"))]
    assert top == ["format", "task", "data", "model", "teacher", "student", "levels", "optim", "schedule", "train", "output"]
