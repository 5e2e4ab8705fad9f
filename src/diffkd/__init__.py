"""DiffKD: knowledge diffusion for distillation, for any PyTorch model."""
__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it); CHANGELOG.md says what changed

from .distiller import DistillOutput, Distiller, Level
from .module import DiffKD, DiffKDOutput
from .taps import FeatureTaps, Tap, probe_shapes

__all__ = ["DiffKD", "DiffKDOutput", "Distiller", "DistillOutput", "Level", "Tap", "FeatureTaps", "probe_shapes"]
