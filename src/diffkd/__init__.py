"""DiffKD: knowledge diffusion for distillation, for any PyTorch model."""
from .distiller import DistillOutput, Distiller, Level
from .module import DiffKD, DiffKDOutput
from .taps import FeatureTaps, Tap, probe_shapes

__all__ = ["DiffKD", "DiffKDOutput", "Distiller", "DistillOutput", "Level", "Tap", "FeatureTaps", "probe_shapes"]
__version__ = "0.1.0"
