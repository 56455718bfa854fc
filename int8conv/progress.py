"""tqdm progress bars that ``-q`` silences, and log lines that repeated work would only repeat."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled under ``-q`` (INT8CONV_QUIET=1)."""
    return tqdm(iterable, disable=os.environ.get("INT8CONV_QUIET") == "1", leave=False, **kwargs)


class BarSafeHandler(logging.StreamHandler):
    """A log handler that writes through ``tqdm.write``: a line logged while a bar is drawn (a skipped image, a
    worker's news) gets a line of its own and the bar is redrawn below it, instead of being glued to the bar's text."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # what logging.StreamHandler does: report the record, never raise from a log call
            self.handleError(record)


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers to ``level`` for a while: variants of one step (candidate tables, scoring and timing
    models) would repeat what the final step says once."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.setLevel(old)
