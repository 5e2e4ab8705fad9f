"""DiffKD: knowledge diffusion for distillation, for any PyTorch model."""
from .module import DiffKD, DiffKDOutput

__all__ = ["DiffKD", "DiffKDOutput"]
__version__ = "0.1.0"
