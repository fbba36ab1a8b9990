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
