"""Run configuration: typed sections, a strict checker, YAML files and `key=value` overrides."""

from .checking import ConfigError
from .files import apply_overrides, config_from_dict, config_to_dict, dump_config, load_config, save_config
from .schema import (
    Config,
    DataConfig,
    DetectionConfig,
    LevelConfig,
    ModelConfig,
    MosaicsConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    SegmentationConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DetectionConfig",
    "LevelConfig",
    "ModelConfig",
    "MosaicsConfig",
    "OptimConfig",
    "OutputConfig",
    "ScheduleConfig",
    "SegmentationConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "save_config",
]
