"""Atomic file writes: a file appears under its final name complete, or not at all.

    with atomic_path("out/model.safetensors") as tmp:
        save_file(tensors, tmp)

The writer fills a temporary file beside the target; on success it is flushed
to disk (fsync) and renamed over the target in one step; on any error it is
deleted. An interrupted run therefore never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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
