"""The one blockwise runner: submit tasks over lazily generated blocks with a bounded window, retry, progress."""

from __future__ import annotations

import itertools
import time

from volrestore.errors import UserError


TASK_RETRIES = 2  # a block task that raises is retried this often, then the run stops naming the block



def run_blocks(client, fn, args, blocks, total, what, progress, on_result, resources=None):
    """Run fn(*args, index) for every block with a bounded number in flight; on_result(index, result) as each ends.

    A block that still fails after TASK_RETRIES retries (or kills its worker ALLOWED_FAILURES times) stops the run
    with a UserError naming it.
    """
    from distributed import as_completed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    in_flight = max(4, 2 * sum(client.nthreads().values()))
    blocks = iter(blocks)
    futures = {}

    def submit(index):
        fut = client.submit(fn, *args, index, key=f"{fn.__name__}-{args[0].run}-{'.'.join(map(str, index))}",
                            retries=TASK_RETRIES, pure=False, resources=resources)
        futures[fut] = index
        return fut

    columns = [TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(what, total=total, rate="")
        queue = as_completed([submit(i) for i in itertools.islice(blocks, in_flight)])
        t0, voxels = time.perf_counter(), 0
        try:
            for fut in queue:
                index = futures.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    msg = str(exc).splitlines()[0] if str(exc) else ""
                    raise UserError(f"block {index} failed while {what} after {TASK_RETRIES + 1} tries: "
                                    f"{type(exc).__name__}: {msg}") from None
                on_result(index, result)
                voxels += result[1]
                bar.update(task, advance=1, rate=f"{voxels / max(time.perf_counter() - t0, 1e-9):.3g} vox/s")
                for nxt in itertools.islice(blocks, 1):
                    queue.add(submit(nxt))
        finally:
            if futures:
                client.cancel(list(futures))
