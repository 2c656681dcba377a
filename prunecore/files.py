"""`write_atomic`: every file prunecore writes appears whole or not at all.

The data goes to a hidden temporary file beside the target, which then replaces the target in
one `os.replace`. A failure midway (a full disk, an exception, Ctrl-C) removes the temporary
file and leaves what was there; a SIGKILL cannot run that cleanup, so temporary names carry the
writer's pid and the next write to the same target removes those whose writer is gone.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import IO, Callable

from prunecore.errors import UserError

__all__ = ["OutputPathError", "check_output_path", "write_atomic"]


class OutputPathError(UserError, OSError):
    """A file cannot be written where the user asked: a folder, a path under a file, no space, no permission."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Temporary files of `path` left by writers that were killed (their pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def check_output_path(path: str | Path, what: str = "output file") -> Path:
    """`path` as a Path, or an `OutputPathError` if it names a folder or sits under a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{what} {str(path)!r} cannot be written: {str(parent)!r} is a file")
            break
    return path


def write_atomic(
    path: str | Path, content: str | bytes | Callable[[IO[bytes]], None], what: str = "output file"
) -> Path:
    """Write `content` (text, bytes, or a function writing to a binary file) to `path` atomically.

    Raises `OutputPathError` naming the file when it cannot be written (a folder, a path under a
    file, a full disk, no permission); the old file, if any, is then untouched.
    """
    path = check_output_path(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
    except OSError as exc:
        raise OutputPathError(f"{what} {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, UserError):
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise OutputPathError(f"{what} {str(path)!r} was not written ({reason}); nothing was changed") from None
        raise
    return path
