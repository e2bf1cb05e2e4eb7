"""`parallel_apply`: bert4keras's multi-process (or multi-thread) map with a bounded input queue."""

from __future__ import annotations

import multiprocessing
import queue
import random as _random
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["parallel_apply_generator", "parallel_apply"]

_STOP = "__bert4x_parallel_apply_stop__"


class _WorkerError:
    def __init__(self, text: str):
        self.text = text


def _work(func, in_queue, out_queue, seed):
    if seed is not None:
        np.random.seed(seed)
        _random.seed(seed)
    while True:
        item = in_queue.get()
        if isinstance(item, str) and item == _STOP:
            return
        index, value = item
        try:
            out_queue.put((index, func(value)))
        except BaseException:  # sent back and raised in the caller, so that a failure cannot leave it waiting
            out_queue.put((index, _WorkerError(traceback.format_exc())))


def parallel_apply_generator(
    func: Callable[[Any], Any],
    iterable: Iterable,
    workers: int,
    max_queue_size: int,
    dummy: bool = False,
    random_seeds: bool | Sequence[int] = True,
) -> Iterator[tuple[int, Any]]:
    """Applies `func` to every item in `workers` processes (threads with `dummy=True`) and yields
    `(index, result)` pairs as results arrive (not in input order).

    At most `max_queue_size` items wait for a worker, so a long iterable is read lazily. Processes are forked, so
    `func` may be a closure or lambda (Linux/macOS). If `func` raises, the workers stop and the error is raised here
    with the worker's traceback.

    Args:
        func: the function of one item.
        iterable: the items.
        workers: how many processes (or threads).
        max_queue_size: how many items may wait for a worker.
        dummy: threads instead of processes.
        random_seeds: True: each worker seeds numpy's and Python's random generators afresh (forked processes would
            otherwise share one state); False: leave them; a list: one seed per worker.

    Example:
    >>> sorted(parallel_apply_generator(lambda x: x * x, range(4), workers=2, max_queue_size=4, dummy=True))
    [(0, 0), (1, 1), (2, 4), (3, 9)]
    """
    if workers < 1 or max_queue_size < 1:
        raise ValueError(f"parallel_apply: workers and max_queue_size must be >= 1, got {workers}, {max_queue_size}.")
    if random_seeds is True:
        seeds = [_random.randrange(2**31) for _ in range(workers)]
    elif random_seeds is False or random_seeds is None:
        seeds = [None] * workers
    else:
        seeds = list(random_seeds)
        if len(seeds) != workers:
            raise ValueError(f"parallel_apply: {len(seeds)} random_seeds for {workers} workers.")
    if dummy:
        in_queue, out_queue = queue.Queue(max_queue_size), queue.Queue()
        pool = [threading.Thread(target=_work, args=(func, in_queue, out_queue, s), daemon=True) for s in seeds]
    else:
        context = multiprocessing.get_context("fork")
        in_queue, out_queue = context.Queue(max_queue_size), context.Queue()
        pool = [context.Process(target=_work, args=(func, in_queue, out_queue, s), daemon=True) for s in seeds]
    for worker in pool:
        worker.start()

    def results(block: bool):
        while True:
            try:
                index, value = out_queue.get(block=block)
            except queue.Empty:
                return
            if isinstance(value, _WorkerError):
                raise RuntimeError(f"parallel_apply: func failed on item {index}:\n{value.text}")
            yield index, value
            if block:
                return

    sent = received = 0
    try:
        for index, item in enumerate(iterable):
            while True:  # hand the item over, draining results meanwhile so that workers never block on output
                try:
                    in_queue.put((index, item), timeout=0.05)
                    break
                except queue.Full:
                    for pair in results(block=False):
                        received += 1
                        yield pair
            sent += 1
            for pair in results(block=False):
                received += 1
                yield pair
        while received < sent:
            for pair in results(block=True):
                received += 1
                yield pair
    finally:
        for _ in pool:
            try:
                in_queue.put(_STOP, timeout=1)
            except queue.Full:
                break
        for worker in pool:
            if not dummy and worker.is_alive() and received < sent:
                worker.terminate()
            worker.join(timeout=5)


def parallel_apply(
    func: Callable[[Any], Any],
    iterable: Iterable,
    workers: int,
    max_queue_size: int,
    callback: Callable[[Any], Any] | None = None,
    dummy: bool = False,
    random_seeds: bool | Sequence[int] = True,
    unordered: bool = True,
) -> list | None:
    """`func` of every item, computed in parallel (see `parallel_apply_generator`).

    Args:
        func, iterable, workers, max_queue_size, dummy, random_seeds: as in `parallel_apply_generator`.
        callback: called on each result as it arrives (then nothing is returned).
        unordered: without a callback, return the results as they arrived (True) or in input order (False).

    Example:
    >>> parallel_apply(lambda x: x + 1, range(5), workers=2, max_queue_size=2, unordered=False)
    [1, 2, 3, 4, 5]
    """
    pairs = parallel_apply_generator(func, iterable, workers, max_queue_size, dummy, random_seeds)
    if callback is not None:
        for _, result in pairs:
            callback(result)
        return None
    pairs = list(pairs)
    if not unordered:
        pairs.sort(key=lambda pair: pair[0])
    return [result for _, result in pairs]
