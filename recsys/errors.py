"""One exception root for the project's own errors.

The CLI turns any `RecsysError` into a one-paragraph message and exit code 2; the gRPC servicer maps
subclasses to status codes. Messages should name the file, column/field and row, and say the fix.
"""

from __future__ import annotations


class RecsysError(Exception):
    """Root of every error the engine raises on purpose."""


class InputError(RecsysError):
    """Bad user input: a missing file or column, an unparseable value, unknown ids, a bad flag."""


class NotFoundError(InputError):
    """A named thing that does not exist (a model version, a serving variant): gRPC NOT_FOUND."""


class ConfigError(RecsysError):
    """A configuration that cannot be honoured (bad YAML/JSON, out-of-range values)."""


class ModelError(RecsysError):
    """A model artifact that cannot be loaded or used (missing, corrupt, incompatible)."""


class MissingDependencyError(RecsysError):
    """An optional dependency is not installed; the message names the pip command."""
