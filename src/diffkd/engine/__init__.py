"""The training engine: one loop for every task and mode, with checkpoints, resume, AMP, EMA and DDP."""

from .checkpoint import evaluated_weights, find_checkpoint, load_checkpoint
from .errors import CheckpointError, EngineError, NonFiniteLossError, RunDirError, RunInterrupted, RunWriteError
from .evaluation import evaluate, evaluate_checkpoint
from .export import export_weights
from .learner import LEARNERS
from .rundir import resume_or_restart
from .trainer import RunResult, run

MODES = tuple(LEARNERS)

__all__ = [
    "MODES",
    "CheckpointError",
    "EngineError",
    "NonFiniteLossError",
    "RunDirError",
    "RunInterrupted",
    "RunWriteError",
    "RunResult",
    "evaluate",
    "evaluate_checkpoint",
    "evaluated_weights",
    "export_weights",
    "find_checkpoint",
    "load_checkpoint",
    "resume_or_restart",
    "run",
]
