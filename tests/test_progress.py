"""Log lines and progress bars share stderr: a warning logged while a bar is drawn must start its own line."""

from __future__ import annotations

import logging

from int8conv.cli import setup_logging
from int8conv.progress import progress


def test_a_warning_during_a_bar_starts_its_own_line(monkeypatch, capsys):
    """Before, a skipped image's warning was glued to the bar's text ('... 8/14 [00:00, 32img/s]WARNING ...')."""
    monkeypatch.delenv("INT8CONV_QUIET", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging(verbose=False, quiet=False)
    try:
        with progress(total=4, desc="calibrating", mininterval=0) as bar:
            bar.update(2)
            logging.getLogger("int8conv.test").warning("skipping broken.jpg: not a readable image")
            bar.update(2)
    finally:  # the root logger as pytest had it
        root.handlers[:] = handlers
        root.setLevel(level)  # setLevel, not .level: it clears the loggers' cached levels
    err = capsys.readouterr().err
    assert "calibrating" in err
    at = err.index("WARNING int8conv.test: skipping broken.jpg: not a readable image\n")
    assert at > 0 and err[at - 1] in "\r\n", repr(err[max(0, at - 40) : at + 10])
