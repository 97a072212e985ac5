"""Whether a failed write ran out of room, and the one line that tells the user so.

A full disk, a quota or the process's file-size limit reaches ftune as whatever the writer raises: OSError with
ENOSPC, EDQUOT or EFBIG from Python, torch.save's RuntimeError from its C++ zip writer (no errno at all),
safetensors' error with "(os error 27)" in its text. So the decision never rests on the exception class: it reads
the errno wherever the exception chain carries one, and otherwise the filesystem's state while the partial write is
still there: free space all but gone where the write went, or a file there that reached the file-size limit
(``ulimit -f``). A failure for lack of permission is reported the same way.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from ftune.errors import FtuneError

SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
PERMISSION = {errno.EACCES, errno.EROFS, errno.EPERM}
NEARLY_FULL = 1 << 20  # bytes free below which no write of a model file can succeed there
# errno as Rust (safetensors, tokenizers) and Python spell it inside a message.
ERRNO_TEXT = re.compile(r"os error (\d+)|code: (\d+)|\[Errno (\d+)\]")
# Frames a write passes through (torch.save, save_pretrained, a Trainer's checkpoint save): a failure without an errno
# is read from the filesystem's state only when it happened inside one of them.
WRITING = re.compile(r"save|write|flush|dump|serializ")


def mib(size: float) -> str:
    value = size / 2**20
    return f"{value:,.0f} MiB" if value >= 10 else f"{value:.2g} MiB"


def file_size_limit() -> int | None:
    """The process's file-size limit (RLIMIT_FSIZE) in bytes, None when unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def report_file_size_limit() -> None:
    """Have a write past the file-size limit fail with EFBIG instead of SIGXFSZ killing the process without a word."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def causes(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def write_errno(err: BaseException) -> tuple[int, str | None] | None:
    """The space or permission errno somewhere in ``err``'s chain, with the file it names if it names one."""
    for cause in causes(err):
        codes = [cause.errno] if isinstance(cause, OSError) and cause.errno else []
        codes += [int(next(g for g in match.groups() if g)) for match in ERRNO_TEXT.finditer(str(cause))]
        for code in codes:
            if code in SPACE | PERMISSION:
                return code, getattr(cause, "filename", None)
    return None


def while_writing(err: BaseException) -> bool:
    for cause in causes(err):
        frame = cause.__traceback__
        while frame is not None:
            if WRITING.search(frame.tb_frame.f_code.co_name):
                return True
            frame = frame.tb_next
    return False


def files_at_limit(where: Path, limit: int | None) -> list[Path]:
    if limit is None or not where.exists():
        return []
    files = [where] if where.is_file() else [p for p in where.rglob("*") if p.is_file()]
    return [p for p in files if p.stat().st_size >= limit]


def free_bytes(path: Path) -> int:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free


@dataclass(frozen=True)
class Shortage:
    """What stopped a write: where, what the system said, and the room there."""

    path: Path
    reason: str
    free: int
    limit: int | None  # the file-size limit, where it is what the write ran into
    permission: bool = False


def shortage(err: BaseException, where: Path) -> Shortage | None:
    """The shortage that made ``err`` happen while writing under ``where``, or None when it is not one."""
    found = write_errno(err)
    limit = file_size_limit()
    at_limit = files_at_limit(where, limit)
    if found is not None:
        code, filename = found
        path = Path(filename) if filename else at_limit[0] if at_limit else where
        efbig_at_limit = code == errno.EFBIG and limit is not None
        return Shortage(path, os.strerror(code), free_bytes(path), limit if efbig_at_limit else None, permission=code in PERMISSION)
    if not while_writing(err):
        return None
    if at_limit:
        return Shortage(at_limit[0], os.strerror(errno.EFBIG), free_bytes(at_limit[0]), limit)
    free = free_bytes(where)
    if free < NEARLY_FULL:
        return Shortage(where, os.strerror(errno.ENOSPC), free, None)
    return None


class DiskFull(FtuneError):
    """A write that failed for lack of room (or permission): one line with the path, the room there, the need and the fix."""

    def __init__(self, found: Shortage, *, needs: str, then: str) -> None:
        self.found, self.needs, self.then = found, needs, then
        if found.permission:
            super().__init__(f"{found.path}: {found.reason}; fix its permissions (or pick another folder) and {then}")
            return
        limit = f", file-size limit (ulimit -f) {mib(found.limit)}" if found.limit is not None else ""
        fix = "raise the file-size limit (ulimit -f)" if found.limit is not None else "free space"
        super().__init__(f"cannot write {found.path}: {found.reason}; {mib(found.free)} free there{limit}; {needs}; {fix} and {then}")

    def restated(self, *, needs: str | None = None, then: str) -> DiskFull:
        return DiskFull(self.found, needs=needs or self.needs, then=then)


AGAIN = "run the command again"


@contextmanager
def explained(where: Path | Callable[[], Path], *, needs: str | Callable[[], str], then: str = AGAIN,
              cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a failed write under ``where`` that a full disk, a quota, the file-size limit or a permission caused into
    DiskFull, after ``cleanup`` (removing what the write left half done); anything else passes through unchanged.
    A DiskFull from a write nested inside keeps its path and need, and takes this caller's next step."""
    try:
        yield
    except DiskFull as inner:
        place = where() if callable(where) else where
        ours = inner.found.path == place or place in inner.found.path.parents  # then this caller knows the need better
        restated = inner.restated(needs=(needs() if callable(needs) else needs) if ours else None, then=then)
        if cleanup is not None:
            cleanup()
        raise restated from inner.__cause__
    except FtuneError:
        raise
    except Exception as err:
        found = shortage(err, where() if callable(where) else where)
        if found is None:
            raise
        full = DiskFull(found, needs=needs() if callable(needs) else needs, then=then)  # measured before the cleanup
        if cleanup is not None:
            cleanup()
        raise full from err


def written_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def staged_failure(err: BaseException, staging: Path, target: Path) -> DiskFull | None:
    """DiskFull (caused by ``err``) for a write into ``staging`` (about to replace ``target``) that ran out of room,
    measured before the staging copy is removed: the need is more than what it had written."""
    if isinstance(err, FtuneError) and not isinstance(err, DiskFull):
        return None
    found = err.found if isinstance(err, DiskFull) else shortage(err, staging)
    if found is None:
        return None
    if found.path == staging or staging in found.path.parents:  # name what the user asked for, not the hidden copy
        found = replace(found, path=target / found.path.relative_to(staging))
    if isinstance(err, DiskFull):
        full, err = DiskFull(found, needs=err.needs, then=err.then), err.__cause__ or err
    else:
        full = DiskFull(found, needs=f"the write needs more than the {mib(written_bytes(staging))} it had put down", then=AGAIN)
    full.__cause__ = err
    return full
