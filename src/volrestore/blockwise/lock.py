"""The output lock: one run at a time writes an output; a lock file inside it names the owner and beats a heartbeat."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from volrestore.errors import UserError

LOCK_NAME = ".volrestore-lock"
# A lock whose heartbeat is older than this is stale (its owner died, maybe on another host); an owner on this host
# whose process is gone is stale at once. Heartbeats come every HEARTBEAT_S; both can be tuned for slow file systems.
STALE_AFTER_S = float(os.environ.get("VOLRESTORE_LOCK_STALE_S", "120"))
HEARTBEAT_S = float(os.environ.get("VOLRESTORE_LOCK_HEARTBEAT_S", "10"))


def lock_path(output) -> Path:
    """The lock file of an output."""
    return Path(output) / LOCK_NAME


def read_lock(output) -> dict | None:
    """The lock's owner record ({run, host, pid, started, heartbeat}), None when unlocked or unreadable mid-write."""
    try:
        return json.loads(lock_path(output).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_stale(owner: dict, now: float | None = None) -> bool:
    """True when the owner cannot be running: its process is gone (same host) or its heartbeat is too old."""
    now = time.time() if now is None else now
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return True
    return now - float(owner.get("heartbeat", 0)) > STALE_AFTER_S


def describe(owner: dict) -> str:
    """The owner in words for an error message."""
    age = time.time() - float(owner.get("heartbeat", 0))
    return (f"host {owner.get('host')} pid {owner.get('pid')} (started {owner.get('started')}, "
            f"last heartbeat {age:.0f} s ago)")


def refuse_if_locked(output, wait_s: float = 0.0) -> None:
    """UserError naming the holder when a run holds (or, stale, held) the output's lock; waits up to `wait_s` for a
    lock that another run is about to write (it made the folder a moment ago)."""
    deadline = time.monotonic() + wait_s
    while (owner := read_lock(output)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if owner is not None:
        state = "a run that is not running (stale)" if is_stale(owner) else "another run"
        raise UserError(f"output {output} is locked by {state}: {describe(owner)}; wait for it to finish, or choose "
                        "another output")


class OutputLock:
    """An exclusive lock on one output folder, held while a run creates, resumes, overwrites or completes it.

    `acquire(create=True)` makes the folder itself (atomically: two fresh runs cannot both get it) and then the lock
    file; with create=False the folder must exist. A lock held by a live run is always refused; a stale one only with
    `break_lock=True`. While held, a daemon thread refreshes the heartbeat every HEARTBEAT_S.
    """

    def __init__(self, output, break_lock: bool = False):
        self.output, self.break_lock = Path(output), break_lock
        self.run = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def acquire(self, create: bool) -> OutputLock:
        """Take the lock (UserError naming the holder when another run has it); returns self."""
        if create:
            try:
                os.mkdir(self.output)
            except FileExistsError:
                refuse_if_locked(self.output, wait_s=2.0)
                raise UserError(f"output {self.output} appeared while this run started; choose another path, or "
                                "pass --resume or --overwrite") from None
            except OSError as exc:
                raise UserError(f"cannot create output {self.output}: {exc.strerror}; check the folder exists and "
                                "is writable") from None
        while not self._try_create():
            owner = read_lock(self.output)
            if owner is None:  # the holder is writing its record (or just released): look again
                time.sleep(0.05)
                owner = read_lock(self.output)
                if owner is None:
                    continue
            if not is_stale(owner):
                raise UserError(f"output {self.output} is locked by another run: {describe(owner)}; wait for it "
                                "to finish or choose another output")
            if not self.break_lock:
                raise UserError(f"output {self.output} has a stale lock of a run that is not running: "
                                f"{describe(owner)}; pass --break-lock to take it over")
            self._break(owner)
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="volrestore-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held and (read_lock(self.output) or {}).get("run") == self.run:
            lock_path(self.output).unlink(missing_ok=True)
        self.held = False

    def moved_to(self, output) -> None:
        """The locked folder was renamed to `output` (the end of an overwrite): keep beating there."""
        self.output = Path(output)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def _record(self) -> dict:
        now = time.time()
        return {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(),
                "started": getattr(self, "_started", None) or datetime.now(UTC).isoformat(timespec="seconds"),
                "heartbeat": now}

    def _try_create(self) -> bool:
        self._started = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            fd = os.open(lock_path(self.output), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise UserError(f"cannot lock output {self.output}: {exc.strerror}; check that it is writable") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _break(self, owner: dict) -> None:
        """Remove a stale lock; if another run replaced it in between, put theirs back."""
        aside = lock_path(self.output).with_name(f"{LOCK_NAME}.broken-{self.run}")
        try:
            os.rename(lock_path(self.output), aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            moved = {}
        if moved.get("run") != owner.get("run"):
            os.rename(aside, lock_path(self.output))  # not the stale lock we examined: a live run's
            raise UserError(f"output {self.output} was just locked by another run: {describe(moved)}")
        aside.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            record = read_lock(self.output)
            if record is None or record.get("run") != self.run:
                continue  # moved mid-rename, or broken by someone: never overwrite another run's lock
            tmp = lock_path(self.output).with_name(f"{LOCK_NAME}.{self.run}.tmp")
            try:
                tmp.write_text(json.dumps({**record, "heartbeat": time.time()}))
                os.replace(tmp, lock_path(self.output))
            except OSError:
                pass  # a missed beat only brings staleness closer; the next beat retries


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
