"""Artifact files: atomic writes and content fingerprints.

Atomic: write `<path>.tmp-<pid>` beside the target, fsync, then `os.replace`, so an interrupted
command never leaves a file or folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PENDING: set[Path] = set()
"""Temporary paths being written right now, for `remove_pending_temporaries` (process-wide on purpose: a
signal handler has no other way to reach them)."""


def remove_pending_temporaries() -> None:
    """Delete every temporary file or folder an `atomic_path` is writing (used when the process is terminated)."""
    for tmp in list(_PENDING):
        _remove(tmp)


def temp_path_for(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def pending_temporary(path: Path) -> Iterator[Path]:
    """Mark `path` as a temporary being written: removed on failure and when the process is terminated."""
    _PENDING.add(path)
    try:
        yield path
    except BaseException:
        _remove(path)
        raise
    finally:
        _PENDING.discard(path)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `path`, on any failure it is removed.

    Works for a file or a folder written at the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    _remove(tmp)
    with pending_temporary(tmp):
        yield tmp
        if tmp.is_dir():
            for child in tmp.rglob("*"):
                if child.is_file():
                    _fsync_path(child)
        elif tmp.exists():
            _fsync_path(tmp)
        if tmp.is_dir() and path.exists():
            _remove(path)
        os.replace(tmp, path)
        _fsync_path(path.parent)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path | str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
