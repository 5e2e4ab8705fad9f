"""Run configuration: typed sections, a strict checker, YAML files and `key=value` overrides."""

from .checking import ConfigError
from .files import apply_overrides, config_from_dict, config_to_dict, dump_config, load_config, save_config
from .schema import (
    Config,
    DataConfig,
    LevelConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LevelConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "save_config",
]
