"""Errors a user can cause and fix, and how command-line entry points report them.

Library code raises `UserError` with one line that says what is wrong and what to
do. It subclasses ValueError so API callers can catch it like any bad argument.
Command-line scripts wrap their main function in `exit_on_user_error`, which
prints that line to stderr and exits with status 2 instead of a traceback.
Anything else that goes wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """A problem with the user's input (config, file, argument), not with the code."""


def require(ok: bool, key: str, expected: str, value) -> None:
    """Raise "KEY must be EXPECTED, got VALUE" unless ok (for checking settings)."""
    if not ok:
        raise UserError(f"{key} must be {expected}, got {value!r}")


def exit_on_user_error(main: F) -> F:
    """Decorate a CLI main(): a UserError becomes 'error: <message>' and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
