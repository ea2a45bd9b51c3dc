"""Artifact files: atomic writes, the checks that keep inputs safe, one writer per folder, content fingerprints.

Atomic: write `<path>.tmp-<pid>` beside the target, fsync, then `os.replace`, so an interrupted command never
leaves a file or folder that looks complete. Temporaries of processes that died (kill -9) are removed by the next
write to the same path; a write the filesystem refuses (no space, file-size limit, permission) is a UserError naming
the path and the cause.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dvae_cli.core.errors import UserError

_PENDING: set[Path] = set()
"""Temporary paths being written right now, for `remove_pending_temporaries` (process-wide on purpose: a
signal handler has no other way to reach them)."""

REFUSED_WRITES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file too large for the file-size limit (ulimit -f)",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system"}
"""The errors by which a filesystem refuses a write, and how they are named to the user."""
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")
"""HDF5 reports the errno of a failed write inside its message, not as the exception's errno."""
LOW_SPACE_BYTES = 1 << 20


def remove_pending_temporaries() -> None:
    """Delete every temporary file or folder being written (used when the process is interrupted or terminated)."""
    for tmp in list(_PENDING):
        remove_tree(tmp)


def temp_path_for(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries beside `path` (`<name>.tmp-<pid>`, `<name>.<part>.tmp-<pid>`) whose process is dead;
    never another live process's."""
    if not path.parent.is_dir():
        return
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not name.startswith(f"{path.name}.") or ".tmp-" not in name:
            continue
        pid = name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            remove_tree(candidate)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a file or a folder with everything in it; nothing when it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def outermost_missing(path: Path) -> Path | None:
    """The first folder on the way to `path` that does not exist (what creating `path` with parents adds); None
    when `path` exists."""
    for ancestor in reversed([path, *path.parents]):
        if not ancestor.exists():
            return ancestor
    return None


def refused_write(path: Path, error: BaseException, written: Path | None = None) -> UserError | None:
    """`error` as a UserError naming `path` and the cause, when the filesystem refused a write; None otherwise.

    The cause comes from the errno (of the exception or, for HDF5, in its message); writers that lose it (torch's
    zip writer) are judged by the file-size limit against the size of `written` and by the free space left.
    """
    code = getattr(error, "errno", None)
    if code not in REFUSED_WRITES:
        found = _ERRNO_IN_MESSAGE.search(str(error))
        code = int(found.group(1)) if found else None
    if code not in REFUSED_WRITES and isinstance(error, (OSError, RuntimeError)):
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        size = written.stat().st_size if written is not None and written.is_file() else 0
        if limit != resource.RLIM_INFINITY and size + LOW_SPACE_BYTES > limit:
            code = errno.EFBIG
        elif path.parent.is_dir():
            usage = shutil.disk_usage(path.parent)
            if 0 < usage.total and usage.free < LOW_SPACE_BYTES:  # pseudo filesystems (/proc) have no size
                code = errno.ENOSPC
    if code not in REFUSED_WRITES:
        return None
    fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
           errno.EFBIG: "raise the limit"}.get(code, "choose a folder you can write to")
    return UserError(f"cannot write {path}: {REFUSED_WRITES[code]}; {fix} and run the command again")


@contextmanager
def pending_temporary(path: Path) -> Iterator[Path]:
    """Mark `path` as a temporary being written: removed on failure and when the process is terminated."""
    _PENDING.add(path)
    try:
        yield path
    except BaseException:
        remove_tree(path)
        raise
    finally:
        _PENDING.discard(path)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise refused_write(path, error) or error from None


@contextmanager
def folders_removed_on_failure(made: Path | None) -> Iterator[None]:
    """On failure, remove the folder `made` (created for the output) with the empty folders under it."""
    try:
        yield
    except BaseException:
        if made is not None and made.is_dir():
            for folder in sorted((made, *made.rglob("*")), key=lambda p: len(p.parts), reverse=True):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `path`, on any failure it is removed.

    Works for a file or a folder written at the yielded path. A write the filesystem refuses becomes a UserError.
    """
    path = Path(path)
    made = outermost_missing(path.parent)
    _make_parent(path)
    remove_stale_temporaries(path)
    tmp = temp_path_for(path)
    remove_tree(tmp)
    with folders_removed_on_failure(made), pending_temporary(tmp):
        try:
            yield tmp
            if tmp.is_dir():
                for child in tmp.rglob("*"):
                    if child.is_file():
                        _fsync_path(child)
            elif tmp.exists():
                _fsync_path(tmp)
            if tmp.is_dir() and path.exists():
                remove_tree(path)
            os.replace(tmp, path)
            _fsync_path(path.parent)
        except (OSError, RuntimeError) as error:
            # Judged before the temporary is removed: its size tells a file-size limit.
            failure = refused_write(path, error, tmp)
            if failure is None:
                raise
            raise failure from None


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


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: Path, inputs: Iterable[Path], option: str = "--out", folder: bool = False) -> None:
    """Refuse, before any work, an output that would destroy an input: one that is (or, through links, resolves
    to) an input, a file inside an input folder, or a `folder` output holding an input; and an output where a file
    is written that is an existing folder (or the reverse), or that lies under a file."""
    for source in inputs:
        inside = out.resolve().is_relative_to(source.resolve()) and out.exists() and source.is_dir()
        if _same(out, source) or inside:
            raise UserError(f"{option} {out} is {'in ' if inside else ''}the input {source}; writing there would "
                            "destroy it, choose another path")
        if folder and source.resolve().is_relative_to(out.resolve()):
            raise UserError(f"{option} {out} holds the input {source}; choose another folder")
    if out.is_dir() and not folder:
        raise UserError(f"{option} {out} is an existing folder; name the file to write")
    if out.exists() and not out.is_dir() and folder:
        raise UserError(f"{option} {out} is an existing file; name a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{option} {out} lies under {parent}, which is a file; choose another path")
    _check_creatable(out, option)


def _check_creatable(out: Path, option: str) -> None:
    """Refuse, before any work, an output where nothing can be created (a pseudo or read-only filesystem, no
    permission), by creating and removing a probe file in the nearest existing folder on its way."""
    folder = next(parent for parent in out.parents if parent.is_dir())
    probe = folder / f".dvae-probe.tmp-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as error:
        failure = refused_write(out, error)
        if failure is not None:
            raise failure from None
        raise UserError(f"{option} {out}: nothing can be created in {folder} ({error.strerror.lower()}); choose "
                        "a folder you can write to") from None
    probe.unlink()


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` (with this process's pid) while the block runs; another holder makes this fail at
    once with a UserError. The kernel drops the lock of a process that dies, so a stale lock file is taken over."""
    _make_parent(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{what} is in use by process {holder} (lock {path}); wait for it to finish or stop "
                            "it, then run again") from None
        # The previous holder may have removed the file between our open and our lock: lock the current one.
        if path.exists() and os.fstat(fd).st_ino == path.stat().st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _PENDING.add(path)
    try:
        yield
    finally:
        _PENDING.discard(path)
        path.unlink(missing_ok=True)
        os.close(fd)
