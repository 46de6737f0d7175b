"""Mistakes a user can make and fix, each explained in one sentence.

Every command-line entry point (``scripts/*.py``) ends on one the same way, through
:func:`run_main` (or, for the LightningCLI, :func:`print_error`): one ``error:`` line on stderr
and exit status 2, instead of a traceback.
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


def print_error(message: object) -> None:
    """Print ``error: MESSAGE`` on stderr, the one line a user's mistake ends in."""
    print(f"error: {message}", file=sys.stderr)


def run_main(main: Callable[[], object]) -> int:
    """Run a script's ``main``: 0 when it returns, 2 with one ``error:`` line on stderr when it
    raises a :class:`UserError`."""
    try:
        main()
    except UserError as err:
        print_error(err)
        return 2
    return 0
