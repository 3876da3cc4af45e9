"""The one blockwise runner: tasks over lazily consumed blocks, bounded in flight, retried (the tries counted), a
failure explained in one line with the worker tracebacks in a log file, and a progress bar."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import traceback
import uuid
from concurrent.futures import FIRST_COMPLETED
from contextlib import contextmanager
from pathlib import Path

from volrestore.blockwise.blocks import Block
from volrestore.cluster.client import machine_cores
from volrestore.errors import UserError, file_of, first_line, resource_advice


TASK_RETRIES = 2  # a block task that raises is retried this often, then the run stops naming the block
WINDOW_MIN, WINDOW_PER_THREAD = 32, 4  # default_window; plan_scale.py measures the submission rate it gives
LOG_DIR_ENV = "VOLRESTORE_LOG_DIR"  # where failure logs go (default: the system's temporary folder)


def run_blockwise(client, fn, blocks, *, args=(), is_done=None, on_result=None, progress=True, what="processing",
                  total=None, window=None, resources=None, key_prefix=None, voxels=None, log=None,
                  after=None) -> int:
    """Run `fn(*args, block)` once for every block of `blocks` that is not done yet; return how many ran.

    - `blocks` (Blocks, or index tuples) is consumed lazily: at most `window` tasks in flight (default_window of the
      client's threads), the next block taken only as one ends: a huge grid never becomes a huge graph or list.
      Blocks with `is_done(block)` true are skipped (they count as done on the bar).
    - A task that raises is submitted again, up to TASK_RETRIES more times (counted here, so the error says how many
      tries were made; a UserError is not retried, and a task whose worker died was already retried by the
      scheduler up to its allowed-failures). Then the tasks in flight are cancelled and a one-line UserError names
      the block, the file when the error names one, the cause with advice (memory, disk full, permissions), the
      tries, and the log file `log` (default `failure_log_path(key_prefix)`) that holds every failed try's traceback.
      Dask workers (and a scheduler in this process) do not also print those failures on the console.
    - `after(block)`: blocks that must end before `block` starts (_Feed holds it, ready ones behind it go first);
      they must come first in `blocks` (spill.wave_order): only blocks in flight or held are checked, nothing grows.
    - `on_result(block, result)` is called here, in this thread, as each task ends: in completion order, not block
      order, so a caller that needs a fixed order (float sums) keeps results by block index and combines them after.
    - `client=None` runs the tasks in a thread pool of this process (fn and args need not pickle); with a Client they
      run on its workers under keys `key_prefix-<index>` (retries `...-try<n>`; default prefix: fn's name and a fresh
      id), with `resources`.
    - `progress`: a rich bar on stderr titled `what` (blocks done of `total`, default len(blocks) if it has one, and
      voxels/s from `voxels(block, result)`, default a Block's write size); nothing at all when progress is False.
    """
    prefix = key_prefix or _default_prefix(fn)
    pool = _DaskPool(client, resources, prefix) if client is not None else _LocalPool()
    failures = Failures(log or failure_log_path(prefix), what)
    window = window or pool.window()
    if total is None and hasattr(blocks, "__len__"):
        total = len(blocks)
    if voxels is None:
        voxels = (lambda block, _: block.size if isinstance(block, Block) else 0)
    pending, ran = {}, 0
    with _Bar(progress, what, total) as bar, _diverted_logs(prefix, failures):
        feed = _Feed(blocks, is_done, after, bar, lookahead=window)

        def fill(n):  # submit up to n more blocks that are not done (in one call)
            batch = feed.take(n, pending)
            for future, block in zip(pool.submit_many(fn, args, batch), batch):
                pending[future] = (block, 1)
            return batch

        try:
            while fill(window - len(pending)) or pending:  # (a held block goes once what it waits for has ended)
                for fut, result, exc in pool.outcomes(pool.wait(list(pending))):
                    block, tries = pending.pop(fut)
                    if exc is not None:  # retried (same slot) or raised
                        failures.record(block, tries, exc)
                        pending[pool.submit(fn, args, block, tries + 1)] = (block, tries + 1)
                        continue
                    ran += 1
                    if on_result is not None:
                        on_result(block, result)
                    bar.advance(voxels(block, result))
        finally:
            pool.close(list(pending))  # after an error: cancel what is still in flight
    return ran


class _Feed:
    """The blocks still to submit, taken lazily: done ones only advance the bar. With `after`, a block that must wait
    for a block in flight (or held, or in the batch being formed) is held, and blocks behind it that are ready go
    first: up to `lookahead` held blocks, so a block's wait never stalls the whole window (dataflow, not waves)."""

    def __init__(self, blocks, is_done, after, bar, lookahead: int):
        self.blocks, self.is_done, self.after, self.bar = iter(blocks), is_done, after, bar
        self.held, self.lookahead = [], lookahead

    def take(self, n: int, pending: dict) -> list:
        """Up to n blocks to submit now (held ones first, in their order)."""
        if self.after is None:
            return [b for b in (self._next() for _ in range(n)) if b is not None]
        batch, unresolved, held = [], {_label(b) for b, _ in pending.values()}, []
        for block in self.held:
            (batch if len(batch) < n and not self._waits(block, unresolved) else held).append(block)
            unresolved.add(_label(block))
        self.held = held
        while len(batch) < n and len(self.held) < self.lookahead and (block := self._next()) is not None:
            (self.held if self._waits(block, unresolved) else batch).append(block)
            unresolved.add(_label(block))
        return batch

    def _next(self):
        """The next block of `blocks` not already done (None at the end)."""
        while (block := next(self.blocks, None)) is not None:
            if self.is_done is None or not self.is_done(block):
                return block
            self.bar.advance(0)
        return None

    def _waits(self, block, unresolved: set) -> bool:
        return any(_label(b) in unresolved for b in self.after(block))


def _label(block) -> tuple:
    return tuple(block_label(block))


def default_window(threads: int) -> int:
    """Tasks kept in flight on a cluster of `threads` worker threads: enough that the round trip of a finished task
    never idles a thread (tasks queue on the scheduler, not on the client), bounded so the client stays small."""
    return max(WINDOW_MIN, WINDOW_PER_THREAD * threads)


def block_label(block):
    """How errors and task keys name a block: its index."""
    return block.index if isinstance(block, Block) else block


def failure_log_path(prefix: str) -> Path:
    """Where a run's worker tracebacks are written when a task fails: `volrestore-<prefix>.log` in $VOLRESTORE_LOG_DIR,
    else in the system's temporary folder."""
    folder = os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir()
    return Path(folder) / f"volrestore-{prefix}.log"


def _outcome(fut):
    """(result, None) of a task that succeeded, (None, exception) of one that raised (its traceback attached: on Dask
    the worker's)."""
    try:
        return fut.result(), None
    except Exception as exc:  # noqa: BLE001 - every task error is explained or retried by Failures
        return None, exc


class Failures:
    """A run's failed tries: each one's traceback appended to the log file; `record` raises the run's one-line
    UserError once a block has no tries left."""

    def __init__(self, log, what):
        self.log, self.what, self.log_error = Path(log), what, None

    def record(self, block, tries, exc) -> None:
        """Log the failed try number `tries` of `block`; return if it may be tried again, else raise the UserError."""
        killed = _killed_tries(exc)  # the scheduler tried that often on different workers
        tries = killed or tries
        final = isinstance(exc, UserError) or killed is not None or tries > TASK_RETRIES
        self._write(block, tries, exc, final)
        if final:
            raise self.error(block, tries, exc) from None

    def error(self, block, tries, exc) -> UserError:
        """The run's one-line error for `block` failing `tries` times with `exc`."""
        killed = _killed_tries(exc) is not None
        if killed:
            cause = "its worker process died each time (KilledWorker)"
        else:
            cause = str(exc) if isinstance(exc, UserError) else first_line(exc)
        parts = [f"block {block_label(block)} failed while {self.what} after {tries} "
                 f"{'try' if tries == 1 else 'tries'}: {cause}"]
        where = file_of(exc)
        if where:
            parts.append(f"file {where}")
        advice = resource_advice(exc) or (KILLED_ADVICE if killed else None)
        if advice:
            parts.append(advice)
        parts.append(f"tracebacks in {self.log}" if self.log_error is None else
                     f"no log written ({self.log_error})")
        return UserError("; ".join(parts))

    def note(self, text: str) -> None:
        """Append a line (a diverted cluster log record) to the log file."""
        self._append(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def _write(self, block, tries, exc, final) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        head = (f"--- {stamp} block {block_label(block)} while {self.what}: try {tries} failed"
                f"{' (no more tries)' if final else ', trying again'}\n")
        body = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if _killed_tries(exc) is not None:
            body += "(no traceback: the worker process died; the worker's own log says why)\n"
        self._append(head + body)

    def _append(self, text: str) -> None:
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as f:
                f.write(text)
        except OSError as err:
            self.log_error = f"{type(err).__name__}: {err.strerror or err}"


KILLED_ADVICE = ("a worker dies like that mostly from running out of memory: use a smaller --tile or --batch, fewer "
                 "--workers, or more memory per worker")


def _killed_tries(exc) -> int | None:
    """For distributed's KilledWorker (the task's worker died on every try): how many tries; else None."""
    if type(exc).__name__ != "KilledWorker":
        return None
    allowed = getattr(exc, "allowed_failures", None)
    return allowed + 1 if isinstance(allowed, int) else 1


def _default_prefix(fn) -> str:
    return f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:12]}"


class QuietTask:
    """A block task on a Dask worker that first stops that worker's logger printing distributed's "Compute Failed"
    report (a 20-50 line traceback) for this run's keys: run_blockwise writes the same traceback into its log file
    and prints one line."""

    def __init__(self, fn, prefix):
        self.fn, self.prefix = fn, prefix
        self.__name__ = getattr(fn, "__name__", "task")

    def __call__(self, *args):
        _QuietComputeFailed.install(self.prefix)
        return self.fn(*args)


class _QuietComputeFailed(logging.Filter):
    """A filter on the worker's "distributed.worker" logger that drops "Compute Failed" records of keys that start
    with one of the installed prefixes (other tasks' failures still print)."""

    prefixes: set = set()

    @classmethod
    def install(cls, prefix) -> None:
        cls.prefixes.add(prefix + "-")
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())

    def filter(self, record) -> bool:
        if not str(record.msg).startswith("Compute Failed") or not record.args:
            return True
        return not str(record.args[0]).startswith(tuple(self.prefixes))


CLUSTER_LOGGERS = ("distributed.scheduler", "distributed.worker")  # where a cluster in this process reports tasks


@contextmanager
def _diverted_logs(prefix, failures):
    """While a run is on: records of the loggers in CLUSTER_LOGGERS (of a cluster running in this process) that
    name one of the run's keys go to the run's log file instead of the console."""
    divert = _DivertKeys(prefix, failures)
    loggers = [logging.getLogger(name) for name in CLUSTER_LOGGERS]
    for logger in loggers:
        logger.addFilter(divert)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(divert)


class _DivertKeys(logging.Filter):
    """Drops (after writing it to the log file) a record whose text names a key of the run."""

    def __init__(self, prefix, failures):
        super().__init__()
        self.key, self.failures = prefix + "-", failures

    def filter(self, record) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left to logging
            return True
        if self.key not in text:
            return True
        self.failures.note(f"{record.name} {record.levelname}: {text}")
        return False


class _DaskPool:
    """Tasks on a distributed.Client."""

    def __init__(self, client, resources, key_prefix):
        from distributed import as_completed

        self.client, self.resources, self.prefix = client, resources, key_prefix
        self.ended = as_completed()

    def window(self) -> int:
        return default_window(sum(self.client.nthreads().values()))

    def submit(self, fn, args, block, attempt):
        key = f"{self.prefix}-{'.'.join(map(str, block_label(block)))}" + (f"-try{attempt}" if attempt > 1 else "")
        future = self.client.submit(QuietTask(fn, self.prefix), *args, block, key=key, retries=0, pure=False,
                                    resources=self.resources)
        self.ended.add(future)
        return future

    def submit_many(self, fn, args, blocks):
        """First tries of several blocks in one client call (one message to the scheduler, not one per task)."""
        if not blocks:
            return []
        keys = [f"{self.prefix}-{'.'.join(map(str, block_label(b)))}" for b in blocks]
        columns = [[a] * len(blocks) for a in args]
        futures = self.client.map(QuietTask(fn, self.prefix), *columns, blocks, key=keys, retries=0, pure=False,
                                  resources=self.resources)
        self.ended.update(futures)
        return futures

    def wait(self, futures):
        """The futures that have ended (at least one): all that ended since the last call, from one as_completed
        stream (a wait over every pending future per call cost more than the tasks themselves)."""
        return self.ended.next_batch(block=True)

    def outcomes(self, done):
        """(future, result, exception) of ended tasks: the results of all that succeeded in one gather (one round
        trip per wait instead of one per task: the client's submission rate depends on it)."""
        finished = [f for f in done if f.status == "finished"]
        try:
            results = self.client.gather(finished) if finished else []
        except Exception:  # noqa: BLE001 - one of them failed after all: fall back to asking each
            return [(f, *_outcome(f)) for f in done]
        failed = [f for f in done if f.status != "finished"]
        return [(f, r, None) for f, r in zip(finished, results)] + [(f, *_outcome(f)) for f in failed]

    def close(self, unfinished):
        if unfinished:
            self.client.cancel(unfinished)


class _LocalPool:
    """Tasks in a thread pool of this process, one thread per core; retried like those on Dask."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = machine_cores()
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="volrestore-block")

    def window(self) -> int:
        return max(4, 2 * self.threads)

    def submit(self, fn, args, block, attempt):
        return self.executor.submit(fn, *args, block)

    def wait(self, futures):
        from concurrent.futures import wait

        return wait(futures, return_when=FIRST_COMPLETED).done

    def submit_many(self, fn, args, blocks):
        """First tries of several blocks."""
        return [self.submit(fn, args, block, 1) for block in blocks]

    def outcomes(self, done):
        """(future, result, exception) of ended tasks."""
        return [(f, *_outcome(f)) for f in done]

    def close(self, unfinished):
        for fut in unfinished:
            fut.cancel()
        self.executor.shutdown(wait=True)


class _Bar:
    """A rich progress bar on stderr: blocks done of total and voxels/s; does nothing when disabled."""

    def __init__(self, enabled, what, total):
        self.enabled, self.what, self.total = enabled, what, total

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
                       TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
            self.progress = Progress(*columns, console=Console(stderr=True), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(self.what, total=self.total, rate="")
            self.t0, self.voxels = time.perf_counter(), 0
        return self

    def advance(self, voxels):
        if self.enabled:
            self.voxels += voxels
            rate = f"{self.voxels / max(time.perf_counter() - self.t0, 1e-9):.3g} vox/s" if self.voxels else ""
            self.progress.update(self.task, advance=1, rate=rate)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
