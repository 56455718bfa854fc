"""``int8conv``: argparse subcommands over the pipeline stages; the work lives in the library modules."""

from __future__ import annotations

import argparse
import logging
import sys

from int8conv import __version__, atomic
from int8conv.commands.common import add_command
from int8conv.commands.validate import check_args, harden
from int8conv.errors import Int8ConvError
from int8conv.progress import BarSafeHandler

log = logging.getLogger("int8conv")

#: subcommand modules under int8conv.commands, in the order ``--help`` lists them
COMMANDS = (
    "calibrate",
    "convert",
    "quantize",
    "eval",
    "export_trt",
    "report",
    "equalize",
    "install_caffe",
    "install_arm",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="int8conv",
        description="Caffe model in, calibrated INT8 deployment out: "
        "ncnn tables and models, TensorRT caches and Q/DQ ONNX, with accuracy and speed "
        "measured against FP32.",
    )
    parser.add_argument("--version", action="version", version=f"int8conv {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        add_command(sub, name)
    for command, subparser in sub.choices.items():  # -v/-q also after the subcommand; checked flags
        harden(subparser, command)
        subparser.set_defaults(_parser=subparser, _command=command)
        group = subparser.add_mutually_exclusive_group()
        group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        group.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="warnings and errors only, no progress bars",
        )
    return parser


def setup_logging(verbose: bool, quiet: bool) -> None:
    """-v: debug; -q: warnings only (and tqdm bars off through INT8CONV_QUIET)."""
    import os

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = BarSafeHandler(sys.stderr)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[handler], force=True)
    if quiet:
        os.environ["INT8CONV_QUIET"] = "1"


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, check, run; whatever goes wrong becomes one line on stderr and an exit code (2: the input, 1: a bug)."""
    try:
        args = parser.parse_args(argv)
        if args.verbose and args.quiet:  # one before the subcommand, the other after it: each parser allows one
            getattr(args, "_parser", parser).error("argument -q/--quiet: not allowed with argument -v/--verbose")
    except SystemExit as exc:  # argparse: a bad flag (2, with its message) or --help/--version (0)
        return int(exc.code or 0)
    setup_logging(args.verbose, args.quiet)
    atomic.COMMITTED.clear()
    try:
        check_args(args, getattr(args, "_parser", parser), getattr(args, "_command", parser.prog))
        return int(args.func(args) or 0)
    except Int8ConvError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # ENOSPC, EACCES, EROFS...: the user's machine, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        log.error("%s%s%s", where, exc.strerror or exc, "; " + _what_was_written())
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; %s", _what_was_written())
        return 130
    except Exception as exc:
        log.error(
            "internal error, this is a bug in int8conv (please report it): %s: %s%s",
            type(exc).__name__,
            exc,
            "" if args.verbose else " (run with -v for the traceback)",
        )
        log.debug("traceback", exc_info=True)
        return 1


def _what_was_written() -> str:
    """True by construction: output sets land whole or not at all, and ``atomic`` records each one that landed."""
    if not atomic.COMMITTED:
        return "no output was written (existing files are unchanged)"
    return (
        f"only these complete outputs were written: {', '.join(map(str, atomic.COMMITTED))}; nothing else was changed"
    )


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
