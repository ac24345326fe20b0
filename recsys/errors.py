"""One exception root for the project's own errors.

The CLI turns any `RecsysError` into a one-paragraph message and exit code 2; the gRPC servicer maps
subclasses to status codes. Messages should name the file, column/field and row, and say the fix.
"""

from __future__ import annotations

# Exit codes of every `recsys` command (documented in the README).
EXIT_OK = 0  # done
EXIT_BAD_INPUT = 2  # bad input, flag or config: nothing was written (a one-paragraph message says why)
EXIT_CHECK_FAILED = 3  # the command ran, but its result failed a check (a CORRUPT version, an SRM)


class RecsysError(Exception):
    """Root of every error the engine raises on purpose."""

    exit_code = EXIT_BAD_INPUT


class InputError(RecsysError):
    """Bad user input: a missing file or column, an unparseable value, unknown ids, a bad flag."""


class NotFoundError(InputError):
    """A named thing that does not exist (a model version, a serving variant): gRPC NOT_FOUND."""


class DataCheckError(InputError):
    """Input data that reads fine but fails a plausibility check (e.g. retrain's data checks)."""


class ConfigError(RecsysError):
    """A configuration that cannot be honoured (bad YAML/JSON, out-of-range values)."""


class ModelError(RecsysError):
    """A model artifact that cannot be loaded or used (missing, corrupt, incompatible)."""


class MissingDependencyError(RecsysError):
    """An optional dependency is not installed; the message names the pip command."""


class CheckFailedError(RecsysError):
    """The command ran, but its result is invalid (exit code 3)."""

    exit_code = EXIT_CHECK_FAILED
