"""Mistakes a user can make and fix, each explained in one sentence.

The command-line entry points print the message of a :class:`UserError` as one ``error:`` line
and exit with status 2, instead of a traceback.
"""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem with the user's input (data, config, checkpoint, paths), said in one sentence."""


class DataConfigError(UserError):
    """A problem with the user's data or data settings."""


class CheckpointError(UserError):
    """A checkpoint that cannot or must not be loaded or written."""


class InferenceError(UserError):
    """A path, option or device given to prediction or export that cannot be used."""


def first_line(err: object) -> str:
    """The first line of an exception's (or a message's) text, for a one-line reason."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def exit_code_of(main: Callable[[], object]) -> int:
    """Run a script's ``main``: 0 when it returns, 2 with one ``error:`` line on stderr when it
    raises a :class:`UserError`."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
