"""Errors a user can cause and fix, and how command-line entry points report them.

Library code raises `UserError` with one line that says what is wrong and what to
do. It subclasses ValueError so API callers can catch it like any bad argument.
Command-line scripts wrap their main function in `exit_on_user_error`, which
prints that line to stderr and exits with status 2 instead of a traceback.
The same wrapper turns the faults of the user's files and machine into one line
and status 2 as well: a file that is missing, a directory, unreadable or not
UTF-8; a disk that is full or read-only. Under torchrun every process exits with
status 2 and only the first (rank 0) prints the line. Ctrl-C exits with status
130, quietly.
Anything else that goes wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import os
import shutil
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """A problem with the user's input (config, file, argument), not with the code."""


def require(ok: bool, key: str, expected: str, value) -> None:
    """Raise "KEY must be EXPECTED, got VALUE" unless ok (for checking settings)."""
    if not ok:
        raise UserError(f"{key} must be {expected}, got {value!r}")


# what to do about an OSError, by errno
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EISDIR: "name a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "it is in the way: choose another name",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.ENOSPC: "the disk is full: free some space or choose another place",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError about a file: what, where, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    line = f"{e.strerror or type(e).__name__}:{where}" if where else (e.strerror or str(e) or type(e).__name__)
    hint = _OS_HINTS.get(e.errno)
    if e.errno == errno.ENOSPC and e.filename:
        free = free_space(os.path.dirname(os.path.abspath(e.filename)))
        hint += f" ({free} free there)" if free else ""
    return f"{line}: {hint}" if hint else line


def free_space(path: str) -> str | None:
    """The free space of the file system holding `path`, e.g. "1.2 GB" (None if unknown)."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError: one line, with the closest option for a
    misspelt one ("unknown option --temprature=0.5: did you mean --temperature?")."""

    def error(self, message: str):
        options = [o for o in self._option_string_actions if o.startswith("--")]
        if "unrecognized arguments: " not in message:
            raise UserError(f"{message}: see {self.prog} --help")
        arg = message.split("unrecognized arguments: ", 1)[1].split()[0]  # the first one
        close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1, cutoff=0.6)
        raise UserError(f"unknown option {arg}" + (f": did you mean {close[0]}?" if close else f": see {self.prog} --help"))


def _stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reading end was closed (a broken pipe that is stdout's,
    not a socket's or a child's)."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLERR)
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout has no file descriptor
        return False


def exit_on_user_error(main: F) -> F:
    """Decorate a CLI main(): a UserError, or a fault of the user's files, becomes one line
    'error: <message>' on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            message = str(e)
        except UnicodeDecodeError as e:
            message = f"a file is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8"
        except BrokenPipeError as e:
            if not _stdout_reader_left():
                message = describe_os_error(e)
            else:  # `| head` has what it wanted: stop quietly, as Unix tools do
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
                sys.exit(141)  # 128 + SIGPIPE
        except OSError as e:
            message = describe_os_error(e)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(130)
        if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":  # under torchrun
            print(f"error: {message}", file=sys.stderr)  # every process exits 2, the first says why
        sys.exit(2)

    return wrapper  # type: ignore[return-value]
