"""The errors ramserve raises for user mistakes.

Each is turned into one line by the CLI and into an OpenAI error object by the server; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging


class RamserveError(Exception):
    """A problem the user can fix; the message names the bad value and the fix."""


class ModelNotFound(RamserveError):
    """The model spec resolves to nothing (no folder, not in the Hugging Face cache)."""


class BadModel(RamserveError):
    """The model exists but cannot be read: missing config, corrupt shard, unsupported type."""


class BudgetError(RamserveError):
    """A budget that cannot be parsed or cannot be met."""


class ConfigError(RamserveError):
    """A configuration value that is out of range."""


def log_failure(log: logging.Logger, e: BaseException, what: str, *args: object) -> None:
    """Log that ``what`` (%-formatted with ``args``) failed with ``e``: a user's problem in its own
    words, anything else with its traceback, which is a bug's."""
    if isinstance(e, RamserveError):
        log.error(f"{what}: %s", *args, e)
    else:
        log.exception(what, *args)


def in_words(e: BaseException) -> str:
    """A failure as a client reads it: a user's problem in its own words, anything else with its
    type too."""
    return str(e) if isinstance(e, RamserveError) else f"{type(e).__name__}: {e}"
