"""Errors a user can act on; the CLI prints their message without a traceback."""


class EngineError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class RunDirError(EngineError):
    """The run directory is in a state the command refuses (exists without --resume/--force, or nothing to resume)."""


class CheckpointError(EngineError):
    """A checkpoint that is missing, truncated, corrupt or not what the command expects; names the file."""


class RunWriteError(EngineError):
    """A file of the run could not be written (disk full, file too large, read-only); names the file and what
    was saved last."""


class NonFiniteLossError(EngineError):
    """A NaN or inf loss; names the terms, the global step and the epoch."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, turned into an interrupt by the CLI) stopped a run; the message says what was saved
    last and how to go on. Still a KeyboardInterrupt, so Python callers (notebooks) see an interrupt as usual."""
