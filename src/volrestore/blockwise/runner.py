"""The one blockwise runner: tasks over lazily consumed blocks, bounded in flight, retried, with a progress bar."""

from __future__ import annotations

import itertools
import time
import uuid
from concurrent.futures import FIRST_COMPLETED
from contextlib import contextmanager, nullcontext

from volrestore.blockwise.blocks import Block
from volrestore.cluster.client import connect, machine_cores
from volrestore.errors import UserError


TASK_RETRIES = 2  # a block task that raises is retried this often, then the run stops naming the block


def run_blockwise(client, fn, blocks, *, args=(), is_done=None, on_result=None, progress=True, what="processing",
                  total=None, window=None, resources=None, key_prefix=None, voxels=None) -> int:
    """Run `fn(*args, block)` once for every block of `blocks` that is not done yet; return how many ran.

    - `blocks` (Blocks, or index tuples) is consumed lazily: at most `window` tasks are in flight (default: twice the
      client's threads, at least 4) and the next block is taken only as one ends, so a huge grid never becomes a
      huge graph or list. Blocks with `is_done(block)` true are skipped (they count as done on the bar).
    - A task that raises is retried TASK_RETRIES times (on Dask a task that kills its worker also counts, up to the
      scheduler's allowed-failures); then the tasks in flight are cancelled and a one-line UserError names the block
      and the error's first line.
    - `on_result(block, result)` is called here, in this thread, as each task ends: in completion order, not block
      order, so a caller that needs a fixed order (float sums) keeps results by block index and combines them after.
    - `client=None` runs the tasks in a thread pool of this process (fn and args need not pickle); with a Client they
      run on its workers under keys `key_prefix-<index>` (default: fn's name and a fresh id), with `resources`.
    - `progress`: a rich bar on stderr titled `what` (blocks done of `total`, default len(blocks) if it has one, and
      voxels/s from `voxels(block, result)`, default a Block's write size); nothing at all when progress is False.
    """
    pool = _DaskPool(client, resources, key_prefix or _default_prefix(fn)) if client is not None else _LocalPool()
    window = window or pool.window()
    if total is None and hasattr(blocks, "__len__"):
        total = len(blocks)
    if voxels is None:
        voxels = (lambda block, _: block.size if isinstance(block, Block) else 0)
    blocks = iter(blocks)
    pending, ran = {}, 0
    with _Bar(progress, what, total) as bar:
        def fill(n):  # submit up to n more blocks that are not done; skipped ones only advance the bar
            while n > 0 and (block := next(blocks, None)) is not None:
                if is_done is not None and is_done(block):
                    bar.advance(0)
                    continue
                pending[pool.submit(fn, args, block)] = block
                n -= 1

        try:
            fill(window)
            while pending:
                done = pool.wait(list(pending))
                for fut in done:
                    block = pending.pop(fut)
                    result = _result(fut, block, what)
                    ran += 1
                    if on_result is not None:
                        on_result(block, result)
                    bar.advance(voxels(block, result))
                fill(len(done))
        finally:
            pool.close(list(pending))  # after an error: cancel what is still in flight
    return ran


def run_blocks(client, fn, args, blocks, total, what, progress, on_result, resources=None):
    """blockwise/restore.py's call: `blocks` are plan index tuples and results are (status, voxels, ...)."""
    return run_blockwise(client, fn, blocks, args=args, on_result=on_result, progress=progress, what=what,
                         total=total, resources=resources, key_prefix=f"{fn.__name__}-{args[0].run}",
                         voxels=lambda _, result: result[1])


@contextmanager
def cluster_client(cluster, workers=None, echo=print):
    """A Client for `cluster` (a spec such as "local" or "tcp://host:port", or a Client) via cluster.client.connect;
    None when cluster is None: run_blockwise then runs in local threads and no cluster is started."""
    with (nullcontext() if cluster is None else connect(cluster, workers, echo=echo)) as client:
        yield client


def block_label(block):
    """How errors and task keys name a block: its index."""
    return block.index if isinstance(block, Block) else block


def _result(fut, block, what):
    try:
        return fut.result()
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"block {block_label(block)} failed while {what} after {TASK_RETRIES + 1} tries: "
                        f"{type(exc).__name__}: {msg}") from None


def _default_prefix(fn) -> str:
    return f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex[:12]}"


class _DaskPool:
    """Tasks on a distributed.Client."""

    def __init__(self, client, resources, key_prefix):
        self.client, self.resources, self.prefix = client, resources, key_prefix

    def window(self) -> int:
        return max(4, 2 * sum(self.client.nthreads().values()))

    def submit(self, fn, args, block):
        key = f"{self.prefix}-{'.'.join(map(str, block_label(block)))}"
        return self.client.submit(fn, *args, block, key=key, retries=TASK_RETRIES, pure=False,
                                  resources=self.resources)

    def wait(self, futures):
        """The futures that have ended (at least one)."""
        from distributed import wait

        return wait(futures, return_when=FIRST_COMPLETED).done

    def close(self, unfinished):
        if unfinished:
            self.client.cancel(unfinished)


class _LocalPool:
    """Tasks in a thread pool of this process, one thread per core; the same retries as on Dask."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = machine_cores()
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="volrestore-block")

    def window(self) -> int:
        return max(4, 2 * self.threads)

    def submit(self, fn, args, block):
        return self.executor.submit(_with_retries, fn, args, block)

    def wait(self, futures):
        from concurrent.futures import wait

        return wait(futures, return_when=FIRST_COMPLETED).done

    def close(self, unfinished):
        for fut in unfinished:
            fut.cancel()
        self.executor.shutdown(wait=True)


def _with_retries(fn, args, block):
    for attempt in itertools.count():
        try:
            return fn(*args, block)
        except Exception:
            if attempt >= TASK_RETRIES:
                raise


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
