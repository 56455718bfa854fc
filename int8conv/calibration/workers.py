"""The calibration loop's threads: decoding overlapped with the forward, and ``jobs`` forward+histogram workers.

One thread decodes and preprocesses the next batches (OpenCV releases the GIL while it decodes and resizes)
while the workers forward (ncnn and OpenCV release it while they compute) and update their own histograms;
the per-worker statistics are merged at the end, which is exact (see ``histograms``), so the table does not
depend on ``jobs``. A worker needs an engine of its own: engines with ``replica()`` (ncnn) get one per job,
others run a single worker.

Memory: the queue holds at most ``jobs + 1`` preprocessed batches and each worker one forward's values. An
engine that computes one image at a time (``images_per_forward = 1``: ncnn) is fed, and decoded for, image by
image (``collect_statistics``), so nothing grows with ``--batch-size``; nothing grows with the number of images.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.engines import Engine

log = logging.getLogger(__name__)

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _engines(engine: Engine, jobs: int) -> list[Engine]:
    replica = getattr(engine, "replica", None)
    if jobs > 1 and replica is None:
        log.info("--jobs %d: the %s engine runs one worker (only the ncnn engine has replicas)", jobs, engine.name)
        return [engine]
    return [engine] + [replica() for _ in range(jobs - 1)]


def _produce(
    batches: Iterator[tuple[np.ndarray, list]], todo: queue.Queue, workers: int, stop: threading.Event
) -> None:
    try:
        for item in batches:
            if stop.is_set():
                return
            todo.put(item)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        todo.put(_Failure(exc))
    finally:
        for _ in range(workers):
            todo.put(_DONE)


def _work(
    engine: Engine,
    values: Sequence[str],
    stats: CalibrationStatistics,
    todo: queue.Queue,
    done: queue.Queue,
    stop: threading.Event,
) -> None:
    step = getattr(engine, "images_per_forward", None)
    try:
        while True:
            item = todo.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                done.put(item)
                continue
            if stop.is_set():  # another thread failed: consume the queue up to the end marker, unworked
                continue
            batch, names = item
            size = step or len(batch)
            for start in range(0, len(batch), size):
                stats.update(engine.forward(batch[start : start + size], values))
            done.put(len(names))
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        done.put(_Failure(exc))
    finally:
        done.put(_DONE)


def stream_statistics(
    engine: Engine,
    batches: Iterator[tuple[np.ndarray, list]],
    values: Sequence[str],
    new_statistics: Callable[[], CalibrationStatistics],
    jobs: int = 1,
    on_images: Callable[[int], None] = lambda n: None,
) -> CalibrationStatistics:
    """Forward every batch and histogram ``values``; ``on_images`` is told how many images each batch held."""
    engines = _engines(engine, max(1, jobs))
    parts = [new_statistics() for _ in engines]
    todo: queue.Queue = queue.Queue(maxsize=len(engines) + 1)
    done: queue.Queue = queue.Queue()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_produce, args=(batches, todo, len(engines), stop), daemon=True, name="calibration-decode"
        )
    ]
    threads += [
        threading.Thread(
            target=_work, args=(e, values, s, todo, done, stop), daemon=True, name=f"calibration-worker-{i}"
        )
        for i, (e, s) in enumerate(zip(engines, parts, strict=True))
    ]
    for thread in threads:
        thread.start()
    failure, running = None, len(engines)
    while running:
        item = done.get()
        if item is _DONE:
            running -= 1
        elif isinstance(item, _Failure):
            failure = failure or item.error
            stop.set()
        else:
            on_images(item)
    while threads[0].is_alive():  # every worker has ended (maybe failed): unblock the producer
        with contextlib.suppress(queue.Empty):
            todo.get(timeout=0.05)
    for thread in threads:
        thread.join()
    if failure is not None:
        raise failure
    filled = [part for part in parts if part.histograms] or parts[:1]
    for part in filled[1:]:
        filled[0].merge(part)
    return filled[0]
