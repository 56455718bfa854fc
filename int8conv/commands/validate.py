"""The CLI's validation layer: every numeric flag and path is checked before any work or any write.

Rules are declared once here, by option string, and ``harden`` applies them to every subcommand's parser (and to
``convert_tool.py``'s), so a bad value stops argparse with exit 2 and a message naming the flag. ``check_args``
then does the checks that need several flags at once (one path given for two files, an output over an input, a
flag that has no effect in the combination given: ``UNUSED``).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from int8conv.atomic import resolve_target
from int8conv.calibration.auto_select import AUTO_METHOD
from int8conv.calibration.thresholds import METHODS
from int8conv.errors import Int8ConvError, OutputError
from int8conv.evaluation.evaluate import MAP_THRESHOLD
from int8conv.pipeline import PREPROCESS_FLAGS


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An integer flag of ``minimum`` or more; ``what`` says what the bound means."""

    def check(text: str) -> int:
        value = int(_number(text, int))
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, not {value}")
        return value

    return check


#: threads, timing runs, batch size, images to score
positive_int = at_least(1, "1 or more")
#: ``--max-images``-like limits: 0 means all, a negative one means nothing
count_or_all = at_least(0, "0 (all) or more")
#: ``--gpu``
device_number = at_least(0, "a device number, 0 or more")


def float_flag(accept: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """A finite float flag that ``accept`` takes; ``rule`` is the message when it does not."""

    def check(text: str) -> float:
        value = float(_number(text, float))
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{rule}, not {text}")
        return value

    return check


finite_float = float_flag(lambda v: True, "")
#: ``--norm``: 0 makes every input 0 (a table of nothing), a negative one flips the sign of the input
positive_float = float_flag(lambda v: v > 0, "must be a positive number")
#: ``--std``: the input is divided by it
nonzero_float = float_flag(lambda v: v != 0, "must be non-zero (the input is divided by it)")
#: a cosine to reach: above 1 is unreachable, 0 or below keeps nothing FP32
cosine_target = float_flag(lambda v: 0 < v <= 1, "a target cosine is in (0, 1]")
#: score and IoU thresholds
fraction = float_flag(lambda v: 0 <= v <= 1, "must be in [0, 1]")
percentile = float_flag(lambda v: 0 < v <= 100, "a percentile is in (0, 100]")


def input_file(text: str) -> Path:
    """A file to read: it must exist and be a file (a directory gives a message, not IsADirectoryError)."""
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    return path


def output_file(text: str) -> Path:
    """A file to write: not a directory or a special file other than a character device (see int8conv.atomic)."""
    try:
        resolve_target(text)
    except OutputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    _writable_folder(text, Path(os.path.realpath(text)).parent)
    return Path(text)


def output_dir(text: str) -> Path:
    """A folder to write into: an existing directory, or a path whose first existing parent is a directory."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a directory")
    _writable_folder(text, Path(os.path.realpath(text)))
    return path


def _writable_folder(text: str, folder: Path) -> None:
    """The first existing folder on the way to ``folder`` must be a directory that takes a new file (tried: root
    passes every permission check, yet cannot create files in /proc or on a read-only mount)."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".int8conv-probe-", dir=folder)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: cannot create files in {folder}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def json_output(text: str) -> str:
    """eval ``--json``: '-' is stdout, anything else a file to write."""
    return text if text == "-" else str(output_file(text))


#: numeric flags, by option string (applied to int/float options only)
NUMERIC: dict[str, Callable[[str], object]] = {
    "--threads": positive_int,
    "--arm-threads": positive_int,
    "--timing-runs": positive_int,
    "--batch-size": positive_int,
    "--max-images": count_or_all,
    "--max-eval-images": count_or_all,
    "--auto-fp32-max-images": positive_int,
    "--auto-fp32-images": positive_int,
    "--size": positive_int,
    "--resize-then-crop": positive_int,
    "--gpu": device_number,
    "--jobs": positive_int,
    "--mean": finite_float,
    "--norm": positive_float,
    "--std": nonzero_float,
    "--auto-fp32": cosine_target,
    "--min-cosine": cosine_target,
    "--score-threshold": fraction,
    "--iou-threshold": fraction,
    "--percentile": percentile,
    # the demos' own flags
    "--runs": positive_int,
    "--top-k": positive_int,
    "--max-calib-images": count_or_all,
}
#: path flags, by subcommand then option string (``--param`` is an output of convert, an input of quantize)
OUTPUT_FILES = {
    "calibrate": ("--output", "--save-stats"),
    "convert_tool.py": ("--output", "--save-stats"),
    "convert": ("--param", "--bin"),
    "quantize": ("--out-param", "--out-bin", "--out-table", "--save-layer-timings"),
    "export-trt": ("--save-stats",),
    "report": ("--save-stats",),
    "equalize": ("--output",),
}
OUTPUT_DIRS = {
    "convert": ("--out-dir",),
    "export-trt": ("--out-dir",),
    "report": ("--out-dir",),
    "convert_tool.py": ("--ncnn-dir",),
}
INPUT_FILES = ("--proto", "--model", "--table", "--load-stats")
INPUT_PAIRS = {"quantize": ("--param", "--bin"), "eval": ("--param", "--bin", "--int8-param", "--int8-bin")}


def harden(parser: argparse.ArgumentParser, command: str) -> None:
    """Give every option of ``command`` its checking ``type``, from the tables above."""
    outputs, dirs = OUTPUT_FILES.get(command, ()), OUTPUT_DIRS.get(command, ())
    inputs = INPUT_FILES + INPUT_PAIRS.get(command, ())
    for action in parser._actions:
        for option in action.option_strings:
            if option in NUMERIC and action.type in (int, float):
                action.type = NUMERIC[option]
            elif option in outputs:
                action.type = output_file
            elif option in dirs:
                action.type = output_dir
            elif option in inputs:
                action.type = input_file
            elif command == "eval" and option == "--json":
                action.type = json_output


def _paths(args: argparse.Namespace, parser: argparse.ArgumentParser, options: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for action in parser._actions:
        for option in action.option_strings:
            value = getattr(args, action.dest, None)
            if option in options and value not in (None, "-"):
                found[option] = Path(value)
    return found


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> None:
    """Checks across flags, before any work: each file on its own path, no output over an input, no flag that the
    combination ignores."""
    outputs = _paths(args, parser, OUTPUT_FILES.get(command, ()) + (("--json",) if command == "eval" else ()))
    inputs = _paths(args, parser, INPUT_PAIRS.get(command, ()) + ("--proto", "--model", "--table"))
    seen: dict[str, str] = {}
    for option, path in list(inputs.items()) + list(outputs.items()):
        key = os.path.realpath(path)
        if key in seen:
            raise Int8ConvError(f"{seen[key]} and {option} are the same file ({path}); give each its own path")
        seen[key] = option
    merged: set[str] = set()
    for path in getattr(args, "load_stats", None) or ():
        if os.path.realpath(path) in merged:  # a glob plus the same file again: its images would count twice
            raise Int8ConvError(f"--load-stats: {path} is given twice; its histograms would be counted twice")
        merged.add(os.path.realpath(path))
    check_unused(args, parser, command)


@dataclass(frozen=True)
class Unused:
    """Flags of ``commands`` that act only with ``needs`` (``active``: the parsed flags have it). Given without it
    they would be silently ignored, so ``check_args`` refuses them, naming them and ``needs``."""

    commands: tuple[str, ...]
    flags: tuple[str, ...]
    active: Callable[[argparse.Namespace], bool]
    needs: str
    why: str  # what reads them there
    remedy: str = "add it"

    def message(self, given: Sequence[str]) -> str:
        names = ", ".join(given)
        verb = "is" if len(given) == 1 else "are"
        return f"{names} {verb} for {self.needs} ({self.why}): {self.remedy}, or drop {names}"


def without_table(commands: tuple[str, ...], flags: tuple[str, ...], needs: str, why: str) -> Unused:
    """Flags that ``--table FILE`` makes idle (the table gives what they would choose)."""
    return Unused(commands, flags, lambda args: args.table is None, needs, why, "drop --table")


#: what every command that calibrates takes (``common.add_calibration_inputs``)
CALIBRATING = ("calibrate", "convert_tool.py", "export-trt", "report")
PREPROCESSING = tuple(PREPROCESS_FLAGS.values())
#: the first rule that a command line breaks is reported (the more specific ones come first)
UNUSED = (
    without_table(
        ("export-trt",),
        ("--method", "--percentile", "--backend", "--jobs", "--batch-size", "--gpu", "--save-stats", "--load-stats"),
        "ranges from statistics, without --table",
        "with --table FILE every range is the table's: no statistics pass and no threshold method runs, and the "
        "images only feed the Q/DQ check, under onnxruntime",
    ),
    without_table(
        ("report",),
        ("--method", "--percentile", "--weights-8bit", "--head-method"),
        "a table computed here, without --table",
        "with --table FILE the thresholds and weight scales are the table's",
    ),
    Unused(
        CALIBRATING,
        ("--percentile",),
        lambda args: args.method in ("percentile", AUTO_METHOD),
        "--method percentile or auto",
        "the percentile of |x| taken as the threshold; auto gives it to its percentile candidate",
        "choose one of them",
    ),
    Unused(
        ("calibrate", "convert_tool.py"),
        ("--weights-8bit",),
        lambda args: not args.legacy_table or args.method not in METHODS or getattr(args, "ncnn_dir", None),
        "the ncnn table format, an INT8 model (convert_tool.py --ncnn-dir) or --method auto/eq",
        "--legacy-table writes one 127/max|W| per weight tensor whatever the levels, and a histogram method's "
        "thresholds never read the weight scales",
        "drop --legacy-table or use --method auto or eq",
    ),
    Unused(
        ("quantize",),
        ("--layer-timings", "--save-layer-timings"),
        lambda args: args.optimize == "speed",
        "--optimize speed",
        "the per-layer timings it decides on",
    ),
    Unused(
        ("quantize",),
        ("--images", "--max-images", *PREPROCESSING),
        lambda args: args.auto_fp32 is not None or args.optimize == "speed",
        "--auto-fp32/--min-cosine or --optimize speed",
        "the FP32-layer search and the timing run the model on preprocessed images; quantizing with the table "
        "alone runs nothing",
        "add one",
    ),
    Unused(
        ("quantize",),
        ("--max-images", *(flag for flag in PREPROCESSING if flag != "--size")),
        lambda args: args.images is not None,
        "--images",
        "the images they limit and preprocess; --optimize speed without images times the model on random "
        "pixels, which only --size shapes",
    ),
    Unused(
        ("quantize",),
        ("--task",),
        lambda args: args.auto_fp32 is not None,
        "--auto-fp32/--min-cosine",
        "the outputs its cosine is measured on",
    ),
    Unused(
        ("eval", "report"),
        ("--score-threshold", "--iou-threshold"),
        lambda args: args.task not in ("classifier", "segmentation"),
        "a detection --task",
        "the boxes they keep and match; a classifier compares output vectors, segmentation its maps thresholded "
        f"at a fixed {MAP_THRESHOLD:g}",
        "choose a detection --task or auto",
    ),
    Unused(
        ("eval", "export-trt"),
        ("--auto-fp32-images", "--auto-fp32-max-images"),
        lambda args: args.auto_fp32 is not None,
        "--auto-fp32",
        "the images it chooses the FP32 layers on",
    ),
    without_table(
        ("eval",),
        ("--int8-param", "--int8-bin"),
        "a given INT8 model, without --table",
        "with --table FILE the INT8 model is quantized here from the table",
    ),
    Unused(
        ("eval",),
        ("--param", "--bin", "--int8-param", "--int8-bin"),
        lambda args: args.ncnn_dir is None,
        "models given file by file, without --ncnn-dir",
        "--ncnn-dir names the models: <stem>.param/.bin, <stem>-int8.param/.bin",
        "drop --ncnn-dir",
    ),
    Unused(
        ("eval",),
        ("--no-fp16",),
        lambda args: args.table is not None,
        "--table",
        "the INT8 model quantized here from the table; a given INT8 model keeps its own weights",
    ),
    Unused(
        ("eval",),
        ("--arm-cpu", "--arm-fp16", "--arm-threads"),
        lambda args: args.arch == "arm64",
        "--arch arm64",
        "the ARM run they configure",
    ),
    Unused(
        ("eval",),
        ("--threads", "--timing-runs", "--layer-times", "--no-caffe", "--backend"),
        lambda args: args.arch != "arm64",
        "the x86 evaluation, without --arch arm64",
        "--arch arm64 runs no Caffe reference, times one pass per image under qemu with --arm-threads, and times "
        "no layer alone",
        "drop --arch arm64",
    ),
    Unused(
        ("eval",),
        ("--backend",),
        lambda args: not args.no_caffe,
        "the Caffe FP32 reference, without --no-caffe",
        "the engine that runs it",
        "drop --no-caffe",
    ),
)


def given_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, flags: Sequence[str]) -> list[str]:
    """Those of ``flags`` the command line set to something other than their default (the default given explicitly
    changes nothing, so it counts as not given), in ``flags``' order."""
    changed = {
        option
        for action in parser._actions
        if getattr(args, action.dest, action.default) != action.default
        for option in action.option_strings
    }
    return [flag for flag in flags if flag in changed]


def check_unused(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> None:
    """The project's rule for combinations: a flag that has no effect in the one given is an error (``UNUSED``)."""
    for rule in UNUSED:
        if command in rule.commands and not rule.active(args):
            given = given_flags(args, parser, rule.flags)
            if given:
                raise Int8ConvError(rule.message(given))
