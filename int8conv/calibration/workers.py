"""The calibration loop's workers: chunks of images in worker processes (ncnn), or one process with decoding
overlapped (OpenCV, pycaffe).

The PyPI ncnn binding holds the GIL while ncnn computes, so threads cannot run two ncnn forwards, or a forward and
a histogram, at once. An engine that hands out a picklable ``reader()`` (ncnn) is therefore run chunk by chunk
(``CHUNK_IMAGES`` images each): the first chunk here, timed, then, when that pays for their start, the rest in
``jobs - 1`` worker processes and this one, each decoding, forwarding and histogramming whole chunks, every core
busy and no values crossing processes: only each chunk's statistics come back (a few KiB per value). Chunks are
merged in chunk order, exact for the counts and extremes (see ``histograms``) and in the same order whatever
``jobs``, so the table does not depend on it.

Other engines run in this process: a thread decodes and preprocesses the next batches (OpenCV releases the GIL while
it decodes and resizes, and while its DNN computes) while the main thread forwards and updates the histograms.

Memory: a chunk is decoded and forwarded image by image, so a process holds one image's values whatever
``--batch-size``, and this one at most ``2 * jobs`` chunks' statistics; in one process the queue holds at most two
preprocessed batches. Nothing grows with the number of images. Each worker process holds its own ncnn net.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.preprocess import ImageTally, Preprocess, iter_batches, log_skipped
from int8conv.ncnn.runtime import available_cores
from int8conv.progress import quiet_loggers

if TYPE_CHECKING:
    from int8conv.engines import Engine
    from int8conv.ncnn.runtime import ValueReader

log = logging.getLogger(__name__)

#: images per task of a worker process: big enough that a task's statistics (a few KiB per value) cost little
#: to send back, small enough to balance the workers
CHUNK_IMAGES = 8
#: the most worker processes ``default_jobs`` picks (each holds its own ncnn net and one image's values)
MAX_DEFAULT_JOBS = 8
#: about what a worker process takes to start (Python, numpy, OpenCV and ncnn imports, the net loaded): workers
#: start when the work they take off this process is worth more than that (res10 on 2 cores: they pay from about
#: 28 images on, where the first image's time times the rest is about 1 s)
WORKER_START_SECONDS = 0.5

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def default_jobs() -> int:
    """One worker process per core this process may run on (at most ``MAX_DEFAULT_JOBS``)."""
    return max(1, min(available_cores(), MAX_DEFAULT_JOBS))


def _produce(batches: Iterator[tuple[np.ndarray, list]], todo: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in batches:
            if stop.is_set():
                return
            todo.put(item)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        todo.put(_Failure(exc))
    finally:
        todo.put(_DONE)


def stream_statistics(
    engine: Engine,
    batches: Iterator[tuple[np.ndarray, list]],
    values: Sequence[str],
    statistics: CalibrationStatistics,
    on_images: Callable[[int], None] = lambda n: None,
) -> CalibrationStatistics:
    """Forward every batch and histogram ``values`` into ``statistics`` while a thread decodes the next batches;
    ``on_images`` is told how many images each batch held."""
    todo: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(batches, todo, stop), daemon=True, name="calibration-decode")
    producer.start()
    try:
        while (item := todo.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.error
            batch, names = item
            statistics.update(engine.forward(batch, values))
            on_images(len(names))
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                todo.get(timeout=0.05)
        producer.join()
    return statistics


#: the reader of a worker process, set once by ``_start_worker`` (its ncnn net then loads once per process)
_READER: ValueReader | None = None


def _start_worker(reader: ValueReader) -> None:
    """A worker process leaves Ctrl-C to the parent (which stops the pool), logs nothing (the parent reports
    skipped images) and ends when its parent is killed (the pool would wait for work forever)."""
    global _READER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger().addHandler(logging.NullHandler())
    _READER = reader
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True, name="calibration-parent-watch").start()


def _end_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _chunk_statistics(
    reader: ValueReader, paths: Sequence[Path], prep: Preprocess, statistics: CalibrationStatistics
) -> tuple[CalibrationStatistics, ImageTally]:
    """Decode, forward and histogram one chunk of images; skipped images are only counted (``chunked_statistics``
    logs every chunk's, in chunk order, wherever it ran)."""
    tally = ImageTally()
    with quiet_loggers("int8conv.calibration.preprocess"):
        for batch, _ in iter_batches(paths, prep, 1, tally):
            statistics.update(reader.forward(batch, packed=True))  # histograms do not need Caffe's layout
    return statistics, tally


def _worker_chunk(
    paths: Sequence[Path], prep: Preprocess, statistics: CalibrationStatistics
) -> tuple[CalibrationStatistics, ImageTally]:
    return _chunk_statistics(_READER, paths, prep, statistics)


def chunked_statistics(
    reader: ValueReader,
    images: Sequence[Path],
    prep: Preprocess,
    new_statistics: Callable[[], CalibrationStatistics],
    jobs: int,
    tally: ImageTally,
    on_images: Callable[[int], None] = lambda n: None,
) -> CalibrationStatistics:
    """The statistics of ``images``, chunk by chunk, merged in chunk order (so bit for bit the same whatever
    ``jobs``); skipped images are added to ``tally`` and logged here.

    The first chunk runs here. Its first image, timed, decides: when ``jobs - 1`` worker processes save clearly
    more time than they take to start, they start on the next chunks while this process finishes the first one,
    and this process keeps taking chunks while it waits for theirs (small models and few images stay here).
    """
    chunks = [images[i : i + CHUNK_IMAGES] for i in range(0, len(images), CHUNK_IMAGES)]
    if not chunks:
        return new_statistics()
    merged: CalibrationStatistics | None = None

    def add(part: CalibrationStatistics, part_tally: ImageTally, count: int) -> None:
        nonlocal merged
        for path, reason in part_tally.skipped:
            log_skipped(path, reason)
        tally.used += part_tally.used
        tally.skipped += part_tally.skipped
        if part.histograms and merged is not None:
            merged.merge(part)
        elif part.histograms:
            merged = part
        on_images(count)

    reader.load()
    started = time.perf_counter()
    first, first_tally = _chunk_statistics(reader, chunks[0][:1], prep, new_statistics())
    rest = (time.perf_counter() - started) * (len(images) - 1)
    jobs = max(1, min(jobs, len(chunks)))
    pool = (
        _Pool(reader, chunks, prep, new_statistics, jobs - 1)
        if jobs > 1 and rest * (1 - 1 / jobs) > (jobs - 1) * WORKER_START_SECONDS
        else None
    )
    try:
        first, rest_tally = _chunk_statistics(reader, chunks[0][1:], prep, first)  # the same statistics, continued
        add(
            first,
            ImageTally(first_tally.used + rest_tally.used, first_tally.skipped + rest_tally.skipped),
            len(chunks[0]),
        )
        for index in range(1, len(chunks)):
            part = pool.result(index) if pool else _chunk_statistics(reader, chunks[index], prep, new_statistics())
            add(*part, len(chunks[index]))
    finally:
        if pool is not None:
            pool.close()
    return merged if merged is not None else new_statistics()


class _Pool:
    """Chunks 1.. in ``workers`` processes and in this one, at most ``2 * workers + 1`` of them queued or done
    ahead of the caller (which bounds the statistics held here)."""

    def __init__(
        self,
        reader: ValueReader,
        chunks: Sequence[Sequence[Path]],
        prep: Preprocess,
        new_statistics: Callable[[], CalibrationStatistics],
        workers: int,
    ) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),  # no fork of a process that may hold threads
            initializer=_start_worker,
            initargs=(reader,),
        )
        self.reader, self.chunks, self.prep, self.new_statistics = reader, chunks, prep, new_statistics
        self.ahead = 2 * workers
        self.pending: dict[int, concurrent.futures.Future | tuple[CalibrationStatistics, ImageTally]] = {}
        self.submitted = 1
        self._fill(1)

    def _fill(self, index: int) -> None:
        while self.submitted < len(self.chunks) and self.submitted - index < self.ahead:
            chunk = self.chunks[self.submitted]
            self.pending[self.submitted] = self.executor.submit(_worker_chunk, chunk, self.prep, self.new_statistics())
            self.submitted += 1

    def result(self, index: int) -> tuple[CalibrationStatistics, ImageTally]:
        """Chunk ``index``'s statistics; while a worker still computes it, this process takes the next chunk."""
        self._fill(index)
        item = self.pending[index]
        while (
            isinstance(item, concurrent.futures.Future)
            and not item.done()
            and self.submitted < len(self.chunks)
            and self.submitted - index <= self.ahead
        ):
            chunk = self.chunks[self.submitted]
            self.pending[self.submitted] = _chunk_statistics(self.reader, chunk, self.prep, self.new_statistics())
            self.submitted += 1
        item = self.pending.pop(index)
        return item.result() if isinstance(item, concurrent.futures.Future) else item

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
