"""One measurement in a fresh spawned process: ru_maxrss is a process's peak, so each setting whose
peak memory is reported gets a process of its own."""

from __future__ import annotations

import multiprocessing as mp


def result_of(target, *args, timeout: float = 1800):
    """target(*args, queue) run in a new process -> what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get(timeout=timeout)
    proc.join()
    return result
