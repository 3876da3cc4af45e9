"""User-caused errors: one line that says what is wrong and what to do; the CLI turns them into exit code 2. Also the
one-line advice for failures the machine causes (out of memory, disk full, no permission), shared by the CLI and the
blockwise runner."""

from __future__ import annotations

import errno

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class UserError(Exception):
    """An error the user can fix. The message is one line: the problem, then what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(exc: BaseException) -> str:
    """'TypeName: the first line of its message' (just the type's name for an empty message); an OSError's reason
    without its file name (file_of gives that)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _chain(exc: BaseException | None):
    """`exc` and the exceptions it was raised from or during, newest first (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def file_of(exc: BaseException) -> str | None:
    """The file an error is about, when it says so: a `chunk_file` attribute (tasks may set one) or an OSError's
    filename, on `exc` or on what it was raised from; None when unknown."""
    for e in _chain(exc):
        name = getattr(e, "chunk_file", None) or (e.filename if isinstance(e, OSError) else None)
        if name:
            return str(name)
    return None


def resource_advice(exc: BaseException) -> str | None:
    """What to do about a failure of the machine rather than of the code (memory, disk space, permissions), as one
    phrase; None for any other error."""
    for e in _chain(exc):
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return ("out of memory: use a smaller --tile or --batch, fewer --workers, or a machine with more "
                    "memory")
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return "the disk is full (or over quota): free space there or write to another disk, then run again"
        if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in NOT_PERMITTED):
            return ("permission denied: the output (or its folder) is not writable, or an input is not readable; "
                    "fix the permissions or choose another location")
    return None
