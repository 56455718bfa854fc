#!/usr/bin/env python3
"""Regenerate every shipped table in tables/ and tables/README.md, with the exact commands that make them.

    python scripts/make_tables.py                      # all tables, then their eval numbers and the README
    python scripts/make_tables.py --only mtcnn_det1    # one table (the README is rewritten only for all)

Each table is calibrated with ``int8conv calibrate`` on images that are NOT its evaluation images, then the
FP32 ncnn model is converted (``int8conv convert``) and ``int8conv eval --table`` measures the INT8 model the
table gives against it. The commands below are run as written (paths relative to the repository root, the
shared models in ``../shared`` or ``$INT8CONV_SHARED``); the README shows the same commands.
``--backend opencv`` pins the FP32 engine, so that a machine with pycaffe makes the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8conv.zoo import MODELS, SharedModel, shared_dir, write_digit_cells  # noqa: E402

SHARED = "../shared"  # as written in the commands; resolved through $INT8CONV_SHARED
WORK = "$WORK"  # a scratch folder (the script uses a temporary one, or --work)
DIGITS_CALIB = f"{WORK}/digits_calib"  # LeNet: 200 digit cells of digits.png (offset 0) ...
DIGITS_EVAL = f"{WORK}/digits_eval"  # ... and 200 other cells (offset 12) to evaluate on
MTCNN_FLAGS = ["--mean", "127.5", "--norm", "0.0078125", "--color", "rgb", "--swap-hw"]


@dataclass
class Entry:
    """One shipped table: which model, its preprocessing, and the calibration / evaluation images."""

    name: str
    zoo: str  # the model's key in int8conv.zoo.MODELS: its folder and files
    flags: list[str]
    calib: str
    eval_images: str
    calib_flags: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def model(self) -> SharedModel:
        return MODELS[self.zoo]

    def model_args(self) -> list[str]:
        base = f"{SHARED}/models/{self.model.folder}"
        return ["--proto", f"{base}/{self.model.proto}", "--model", f"{base}/{self.model.caffemodel}"]

    def calibrate_command(self) -> list[str]:
        return [
            "int8conv",
            "calibrate",
            *self.model_args(),
            *self.flags,
            "--images",
            self.calib,
            *self.calib_flags,
            "--backend",
            "opencv",
            "--output",
            f"tables/{self.name}.table",
        ]

    def convert_command(self) -> list[str]:
        return ["int8conv", "convert", *self.model_args(), "--out-dir", f"{WORK}/{self.name}"]

    def eval_command(self) -> list[str]:
        stem = f"{WORK}/{self.name}/{Path(self.model.caffemodel).stem}"
        return [
            "int8conv",
            "eval",
            *self.model_args(),
            *self.flags,
            "--param",
            f"{stem}.param",
            "--bin",
            f"{stem}.bin",
            "--table",
            f"tables/{self.name}.table",
            "--images",
            self.eval_images,
            "--backend",
            "opencv",
            "--threads",
            "1",
        ]

    def commands(self) -> list[list[str]]:
        return [self.calibrate_command(), self.convert_command(), self.eval_command()]


IMAGENET = f"{SHARED}/images/imagenet_samples_200"
FACES = f"{SHARED}/images/faces"
ENTRIES = [
    Entry("res10_300x300_ssd", "res10", ["--mean", "104", "177", "123"], IMAGENET, FACES),
    Entry(
        "open_nsfw_resnet50_1by2",
        "open_nsfw",
        ["--mean", "104", "117", "123", "--resize-then-crop", "256", "256"],
        IMAGENET,
        f"{SHARED}/images/voc_coco_detection",
    ),
    Entry("yufacedetectnet_v1", "yufacedetectnet", [], IMAGENET, FACES),
    Entry(
        "ultraface_slim320",
        "ultraface",
        ["--mean", "127", "127", "127", "--std", "128", "128", "128", "--color", "rgb"],
        IMAGENET,
        FACES,
        note="Head layers (the convolutions whose outputs go straight to `scores` and `boxes`) keep their "
        "input's full range, calibrate's default `--head-method minmax`: with KL there too (`--head-method "
        "same`) the INT8 model finds 35% of the FP32 faces, since faces are the rare large values that KL "
        "clips at the classification heads",
    ),
    Entry(
        "mtcnn_det1",
        "det1",
        MTCNN_FLAGS + ["--size", "320", "240"],
        IMAGENET,
        FACES,
        ["--method", "kl", "--head-method", "same"],
        note="P-Net is fully convolutional: calibrated and evaluated on whole images, 240x320 (the net sees "
        "them transposed). KL, for its heads too (`--method kl --head-method same`): with full-range heads "
        "the output cosine is 0.978 instead of 0.986. Its top-1 agreement is eval's classifier metric, the "
        "argmax over the whole 2xHxW probability map, which says little for P-Net; read the output cosine",
    ),
    Entry(
        "mtcnn_det2",
        "det2",
        MTCNN_FLAGS,
        IMAGENET,
        FACES,
        note="whole images scaled to 24x24, not P-Net proposals: calibrate on your own proposals to deploy",
    ),
    Entry(
        "mtcnn_det3",
        "det3",
        MTCNN_FLAGS,
        IMAGENET,
        FACES,
        ["--method", "minmax"],
        note="whole images scaled to 48x48, not R-Net proposals: calibrate on your own proposals to deploy. "
        "minmax thresholds everywhere: with KL (heads minmax) the box regression conv6-2 "
        "reaches a cosine of 0.977 only, and the output cosine is 0.977 mean / 0.643 on the worst image "
        "(minmax: 0.998 / 0.996)",
    ),
    Entry(
        "lenet_mnist",
        "lenet",
        ["--norm", "0.00390625", "--color", "gray"],
        DIGITS_CALIB,
        DIGITS_EVAL,
        ["--method", "aciq"],
        note="ACIQ thresholds: KL clips conv2's input (pool1, signed and spiky: 8-bit pixels times conv1 "
        "weights) at 0.31 while it reaches 3.25, and the output cosine drops to 0.915 (ACIQ: 0.99996). "
        "Digit cells of opencv_samples/digits.png padded to 28x28: 200 to calibrate, 200 others to "
        "evaluate (this script cuts them into $WORK)",
    ),
    Entry(
        "retinaface_mnet025",
        "retinaface",
        ["--color", "rgb", "--letterbox"],
        IMAGENET,
        FACES,
        note="FPN upsampling by Deconvolution + Crop; the two Deconvolutions stay FP32 (ncnn has no INT8 "
        "Deconvolution)",
    ),
    Entry(
        "yoloface_500k_v2",
        "yoloface",
        ["--norm", "0.00392156862745098", "--color", "rgb"],
        IMAGENET,
        FACES,
        note="Upsample (a fork layer) runs in OpenCV as a registered layer; the SE blocks are two-bottom Scale layers",
    ),
    Entry(
        "shufflenet_v1_driver_action",
        "shufflenet_driver",
        ["--mean", "103.94", "116.78", "123.68", "--norm", "0.017"],
        IMAGENET,
        FACES,
        note="trained on in-car driver crops, which are not here: whole face photos scaled to 50x50 "
        "measure FP32/INT8 agreement only",
    ),
    Entry(
        "mobilenet_yolov3_lite_lane",
        "lane",
        ["--mean", "127.5", "127.5", "127.5", "--norm", "0.007843"],
        IMAGENET,
        f"{SHARED}/images/voc_coco_detection",
        note="DepthwiseConvolution (the fork's type name) is read as a depthwise Convolution; the two "
        "Deconvolutions stay FP32. This net does not survive per-tensor INT8 activations: with any threshold "
        "method (KL, minmax, ACIQ, MSE, percentile) the output cosine stays under 0.3, and a numpy "
        "fake-quantization of the first depthwise layer alone already gives 0.988 (its input's per-channel "
        "ranges differ by 10x); `int8conv quantize --auto-fp32 0.99` reaches 0.992 only with 14 of its 20 "
        "convolutions in FP32",
    ),
]
BY_NAME = {entry.name: entry for entry in ENTRIES}


def resolve(argv: list[str], shared: Path, work: Path) -> list[str]:
    """The command as run here: ``int8conv`` through this interpreter, ``../shared`` and ``$WORK`` resolved."""
    out = [sys.executable, "-m", "int8conv.cli"]
    for arg in argv[1:]:
        if arg.startswith(f"{SHARED}/"):
            arg = str(shared / arg[len(SHARED) + 1 :])
        elif arg.startswith(f"{WORK}/"):
            arg = str(work / arg[len(WORK) + 1 :])
        out.append(arg)
    return out


def prepare_digits(shared: Path, work: Path) -> None:
    """LeNet's calibration and evaluation digits: disjoint sets of 200 cells of OpenCV's digits.png."""
    sheet = shared / "images" / "opencv_samples" / "digits.png"
    write_digit_cells(sheet, work / DIGITS_CALIB.split("/", 1)[1], count=200, offset=0)
    write_digit_cells(sheet, work / DIGITS_EVAL.split("/", 1)[1], count=200, offset=12)


def run(argv: list[str], shared: Path, work: Path) -> None:
    print("+", shell_line(argv), flush=True)
    proc = subprocess.run(
        resolve(argv, shared, work) + ["-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {shell_line(argv)}")


def make_table(entry: Entry, shared: Path, work: Path) -> None:
    """Calibrate: tables/<name>.table."""
    if entry.name == "lenet_mnist":
        prepare_digits(shared, work)
    run(entry.calibrate_command(), shared, work)


def evaluate(entry: Entry, shared: Path, work: Path) -> dict:
    """Convert and evaluate the INT8 model of the shipped table against the FP32 one; eval's JSON report."""
    run(entry.convert_command(), shared, work)
    result = work / f"{entry.name}.json"
    run(entry.eval_command() + ["--json", str(result)], shared, work)
    return json.loads(result.read_text())


def shell_line(argv: list[str]) -> str:
    """The command as a shell line; ``$WORK`` paths stay expandable (double quotes), the rest is quoted."""
    return " ".join(f'"{arg}"' if arg.startswith(WORK) else shlex.quote(arg) for arg in argv)


def metric_text(report: dict) -> str:
    task = report["int8_vs_fp32"]["task"]
    if "map_iou" in task:
        return f"IoU of the maps > {task['map_threshold']}: mean {task['map_iou']:.3f}, min {task['map_iou_min']:.3f}"
    if "top1_agreement" in task:
        return f"top-1 agreement {task['top1_agreement']:.3f}, mean abs prob diff {task['mean_abs_prob_diff']:.4f}"
    return (
        f"precision {task['precision']:.3f}, recall {task['recall']:.3f} "
        f"({task['reference_detections']} FP32 boxes, score >= {report['score_threshold']})"
    )


def count_images(folder: str, shared: Path, work: Path) -> int:
    from int8conv.calibration.preprocess import list_images

    return len(list_images(resolve(["int8conv", folder], shared, work)[-1]))


TABLE_HEADER = (
    "| table | calibrated on (images) | evaluated on (images) | INT8 layers | INT8 vs FP32 "
    "| output cosine mean / min | INT8/FP32 time |"
)


def readme(results: dict[str, dict], shared: Path, work: Path) -> str:
    """tables/README.md: what each table is, the numbers, and the exact commands."""
    rows, sections = [], []
    for entry in ENTRIES:
        report = results[entry.name]
        q = report["int8_vs_fp32"]
        ratio = report["speed_ratio_int8_over_fp32"]["1"]
        fp32 = ", FP32: " + ", ".join(report["fp32_layers"]) if report["fp32_layers"] else ""
        rows.append(
            f"| `{entry.name}.table` | {Path(entry.calib).name} ({count_images(entry.calib, shared, work)}) "
            f"| {Path(entry.eval_images).name} ({report['images']}) | {report['int8_layers']}{fp32} | "
            f"{metric_text(report)} | {q['output_cosine']:.4f} / {q['output_cosine_min']:.4f} | {ratio:.2f} |"
        )
        commands = "\n".join(shell_line(c) for c in entry.commands())
        sections.append(
            f"### {entry.name}.table\n\n" + (f"{entry.note}.\n\n" if entry.note else "") + f"```sh\n{commands}\n```\n"
        )
    return f"""# Calibrated INT8 tables for the shared models

One table per model in `../shared/models`, named after the model's folder (MTCNN: one per net), in the format
today's `ncnn2int8` reads: `<layer>_param_0` per-channel weight scales and `<layer>` input scales, keyed by layer
name, for the ncnn models `int8conv convert` writes (BatchNorm/Scale folded, as `ncnnoptimize` leaves them).
Default pipeline (`int8conv calibrate` with no method flags): `--method auto`, the thresholds of MSE, KL, ACIQ or
percentile whose ncnn INT8 model gives the best output cosine against FP32 on 12 of the calibration images; the
head layers that feed the outputs directly keep their input's full range (`--head-method minmax`); for 3x3
stride-1 convolutions (ncnn's INT8 Winograd) the most weight levels that cannot overflow it (8-bit up to 25 input
channels, 6-bit from 105), 8-bit elsewhere. Where a table departs from it, its section below says why, with the
numbers.

Every table was made by `python scripts/make_tables.py`, which runs the commands below as written (`$WORK` is a
scratch folder; `../shared` is `$INT8CONV_SHARED` when set) and wrote this file. `tests/test_tables.py` runs the
`mtcnn_det1` command again and checks that the table it makes is byte for byte the one shipped here.

Calibration and evaluation images never overlap. The numbers are `int8conv eval`'s: the INT8 ncnn model the table
gives against the ncnn FP32 model, on the ncnn runtime (x86 INT8 kernels), over the evaluation images: the
task metric (detections: same class, IoU >= 0.5), the mean / lowest per-image cosine of the outputs (for SSD
models, the inputs of DetectionOutput), and the INT8/FP32 ratio of median ms/image on one thread (a shared
machine: see `benchmarks/` for side-by-side speed runs).

{TABLE_HEADER}
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

MTCNN `det4` (the landmark refinement net) has no table: its input `data` is 1x15x24x24, five 24x24 RGB patches
cut around the landmarks and stacked, which plain images cannot feed (`int8conv calibrate` refuses it and says so).
Calibrating it needs those patch stacks, i.e. the output of a full MTCNN pipeline run on face images.

## Commands

{chr(10).join(sections)}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="make only these tables")
    parser.add_argument("--no-eval", action="store_true", help="only calibrate (the README is left as it is)")
    parser.add_argument("--work", type=Path, help="scratch folder for $WORK (default: a temporary one)")
    args = parser.parse_args(argv)
    shared = shared_dir()
    entries = [BY_NAME[name] for name in args.only] if args.only else ENTRIES
    with tempfile.TemporaryDirectory(prefix="make-tables-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        results = {}
        for entry in entries:
            make_table(entry, shared, work)
            if not args.no_eval:
                results[entry.name] = evaluate(entry, shared, work)
                print(
                    f"  {entry.name}: {metric_text(results[entry.name])}, output cosine "
                    f"{results[entry.name]['int8_vs_fp32']['output_cosine']:.4f}",
                    flush=True,
                )
        if not args.only and not args.no_eval:
            from int8conv.atomic import write_text_atomic

            write_text_atomic(ROOT / "tables" / "README.md", readme(results, shared, work))
            print("wrote tables/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
