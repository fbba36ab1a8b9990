"""Safe writes: a file appears under its final name complete, or not at all; one writer per directory.

    with atomic_path("out/model.safetensors") as tmp:
        save_file(tensors, tmp)

    lock = DirectoryLock("out/run")   # refuses (UserError) while another live process holds it
    ...
    lock.release()                    # also released when the process ends, however it ends

The writer fills a temporary file beside the target; on success it is flushed
to disk (fsync) and renamed over the target in one step; on any error it is
deleted. An interrupted run therefore never leaves a file that looks finished.

A training run locks its directory, so a second run started on it (a --resume
typed while the first still trains) cannot remove the first's files in progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None

from gpt.errors import UserError, describe_os_error


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str) -> None:
    """Refuse, before any work is done, a file path that cannot be written: a directory, a
    missing parent, a parent that is a file, a read-only place. `what` names the setting."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: name a file")
    if not path.parent.is_dir():
        problem = "is a file" if path.parent.exists() else "does not exist"
        raise UserError(f"{what} {path}: its directory {path.parent} {problem}: create it or choose another place")
    probe = path.with_name(f".{path.name}.write-test-{os.getpid()}")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {path} cannot be written: {describe_os_error(e)}") from None


def check_outputs(outputs: list[tuple[str, str | Path]]) -> None:
    """check_writable for each (setting, path) a command will write, and refuse two settings
    that name one file (compared after resolving links and relative parts), which one would
    overwrite with the other; all before any work is done."""
    named: dict[Path, str] = {}
    for what, path in outputs:
        check_writable(path, what)
        resolved = Path(path).resolve()
        if resolved in named:
            raise UserError(f"{named[resolved]} and {what} both name {path}: one would overwrite the other; "
                            f"give each its own file")
        named[resolved] = what


class DirectoryLock:
    """An advisory lock on a directory: the file DIR/.lock, locked (flock) while held, names its
    owner (pid, host, since when) for the message a second process gets.

    The operating system releases the lock when the owner exits, however it exits (kill -9
    included), so a lock file left by a dead process is simply free: no stale lock to remove.
    The file stays (empty) after release; it never holds anything else.
    """

    NAME = ".lock"

    def __init__(self, directory: str | Path, what: str = "run.out_dir"):
        self.path = Path(directory) / self.NAME
        self._file = None
        if fcntl is None:
            return
        f = open(self.path, "a+")  # never truncated before the lock is ours: the owner's note stays
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip()
            f.close()
            raise UserError(f"{what} {directory} is in use by another run ({_describe_owner(owner)}): wait for it "
                            f"to finish or stop it; two runs writing one directory would damage its checkpoints") from None
        except OSError as e:  # a file system without locks (some network and FUSE mounts)
            f.close()
            print(f"note: {what} {directory} cannot be locked ({e.strerror}): nothing stops a second run from "
                  f"writing there while this one runs", file=sys.stderr)
            return
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.truncate(0)
            self._file.close()  # closing releases the lock
        self._file = None


def _describe_owner(note: str) -> str:
    try:
        owner = json.loads(note)
        return f"process {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is starting"

