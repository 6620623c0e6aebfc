"""The one family of errors a user can fix, and the exit codes the trainer, the tools and the launcher share.

Every error raised because of the user's input (a config key, a data file, a checkpoint, a
tokenizer path, a parallel degree, an HF folder) derives from `TitanlmError`, with a one-line
message that names the key or file and the fix. `main` catches only this family and prints the
line; anything else is a bug and keeps its traceback.

`TitanlmError` is a `ValueError`, so code that guards a user value with `except ValueError`
still sees it.
"""

from __future__ import annotations

import signal

# Exit codes: after a one-line user error, after the run diverged, after Ctrl-C (the shell's code).
USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class TitanlmError(ValueError):
    """Input the user can fix; the message is the single line to print."""

    exit_code = USER_ERROR_EXIT_CODE


class ConfigError(TitanlmError):
    """A configuration value, or a combination of values, that cannot run."""


class ParallelismError(ConfigError):
    """Degrees that do not fit the world size, the model or each other."""


class DataError(TitanlmError):
    """A data file, folder or data setting that cannot be read or used."""


class CheckpointError(TitanlmError):
    """A checkpoint, folder or setting that cannot be used."""


class ModelError(TitanlmError):
    """A model folder, flavor or conversion that cannot be used."""


class MissingFileError(TitanlmError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnsupportedError(TitanlmError, NotImplementedError):
    """A combination this build cannot honour on this device or torch."""


class MissingExtraError(TitanlmError, ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra."""


class TrainingDiverged(TitanlmError):
    """training.max_consecutive_skips steps in a row had an inf/NaN grad norm. Raised on every rank
    alike (the norm is global) at the end of the step, before that step could be saved."""

    exit_code = DIVERGED_EXIT_CODE

    def __init__(self, step: int, skips: int, limit: int) -> None:
        super().__init__(
            f"training diverged: the grad norm was inf/NaN on {skips} steps in a row (steps {step - skips + 1}-"
            f"{step}), whose updates were skipped; stopped at step {step} without saving it "
            f"(training.max_consecutive_skips = {limit}). Resume from an earlier checkpoint with a lower "
            "optimizer.lr, or set training.max_consecutive_skips = 0 to never stop"
        )
        self.step, self.skips = step, skips
