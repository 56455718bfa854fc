"""``eval --arch arm64``: the FP32 and INT8 ncnn models on ncnn's ARM kernels, against themselves and against x86.

What a phone will do is ARM INT8 against ARM FP32, so that comparison gets the same task metrics as the x86
eval (output cosine, per-layer cosine, top-1 agreement or detection precision/recall). ARM against x86 for
each precision (max abs difference, cosine, task metrics, per-layer cosine for INT8) shows where the ARM
kernels (NEON, dot product, i8mm, ARM INT8 Winograd, fp16 storage and arithmetic) change the numbers.
Timings under qemu are emulation timings, not device timings: they are reported only as such.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from importlib import metadata

import numpy as np

from int8conv.arm.runtime import ArmModel, ArmOptions, run_arm
from int8conv.calibration.preprocess import network_inputs
from int8conv.evaluation.evaluate import EvalConfig, ModelPair, fmt, task_text
from int8conv.evaluation.results import ArmDifference, ArmReport, ArmTarget, ArmTiming, Difference, OutputComparison
from int8conv.ncnn.runtime import NcnnRunner

log = logging.getLogger(__name__)

TIMING_NOTE = (
    "timings under qemu emulation: the ARM code is translated instruction by instruction (INT8 ~12x and "
    "FP32 ~100x slower than native), so they are not device timings and not a speed ratio"
)


def _max_abs(
    blobs: list[str], reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]
) -> dict[str, Difference]:
    differences = {name: Difference() for name in blobs}
    for ref, out in zip(reference, candidate, strict=True):
        for name, diff in differences.items():
            diff.add(ref[name], out[name])
    return differences


def evaluate_arm(config: EvalConfig, options: ArmOptions | None = None) -> ArmReport:
    """Run the images through ncnn FP32 and INT8 on x86 and on ARM; return the report."""
    options = options or ArmOptions()
    pair = ModelPair.read(config)
    view, int8_tops = pair.view, pair.int8_tops
    outputs = list(dict.fromkeys(view.blobs + list(pair.fp32.output_names)))
    blobs = list(dict.fromkeys(outputs + list(int8_tops.values())))

    fp32 = NcnnRunner(config.fp32_param, config.fp32_bin, int8=False)
    int8 = NcnnRunner(config.int8_param, config.int8_bin, int8=True)
    inputs = network_inputs(config.images, config.preprocess, fp32.input_names[0])
    x86 = {"fp32": [fp32.extract(x, blobs) for x in inputs], "int8": [int8.extract(x, blobs) for x in inputs]}
    log.info(
        "running %d images x 2 models on ARM kernels (%s, fp16 %s)",
        len(inputs),
        options.cpu,
        "on" if options.fp16 else "off",
    )
    result = run_arm(
        [
            ArmModel(config.fp32_param, config.fp32_bin, False, blobs),
            ArmModel(config.int8_param, config.int8_bin, True, blobs),
        ],
        inputs,
        options,
    )
    arm = {"fp32": result.outputs[0], "int8": result.outputs[1]}

    def compare(
        reference: list[Mapping[str, np.ndarray]],
        candidate: list[Mapping[str, np.ndarray]],
        tops: dict[str, str],
        kind: type[OutputComparison] = OutputComparison,
        **more,
    ) -> OutputComparison:
        comparison = pair.comparison(tops)
        for ref, out in zip(reference, candidate, strict=True):
            comparison.add(ref, out)
        return comparison.summary(kind, **more)

    def arm_vs_x86(precision: str, tops: dict[str, str]) -> ArmDifference:
        difference = _max_abs(view.blobs, x86[precision], arm[precision])
        return compare(x86[precision], arm[precision], tops, ArmDifference, difference=difference)

    return ArmReport(
        **pair.head(len(inputs)),
        arm=ArmTarget(options.cpu, options.fp16, options.threads, result.info),
        x86_ncnn=metadata.version("ncnn"),
        int8_vs_fp32={
            "arm": compare(arm["fp32"], arm["int8"], int8_tops),
            "x86": compare(x86["fp32"], x86["int8"], int8_tops),
        },
        arm_vs_x86={"fp32": arm_vs_x86("fp32", {}), "int8": arm_vs_x86("int8", int8_tops)},
        arm_ms_per_image=ArmTiming(
            statistics.median(result.ms[0]),
            statistics.median(result.ms[1]),
            TIMING_NOTE if result.info["emulated"] else "native ARM timings",
        ),
    )


def format_arm_report(report: ArmReport, worst_layers: int = 5) -> str:
    """The ARM report as text: INT8 vs FP32 on ARM next to x86, then ARM vs x86 per precision."""
    arm, runner = report.arm, report.arm.runner
    where = f"qemu {arm.cpu} (emulated)" if runner["emulated"] else "native"
    lines = [
        f"model      {report.model}",
        f"int8       {report.int8_model} ({report.int8_layers} INT8 layers)",
        f"task       {report.task}   images {report.images}",
        (
            f"ARM        {where}, fp16 {'on' if arm.fp16 else 'off'}, {arm.threads} thread(s), ncnn "
            f"{runner['ncnn']} (x86 {report.x86_ncnn}), CPU features: {', '.join(runner['cpu_features'] or ['?'])}"
        ),
        "",
        "INT8 vs FP32 (same precision comparison as `eval`, on each architecture)",
    ]
    for name in ("arm", "x86"):
        q = report.int8_vs_fp32[name]
        lines += [
            f"  {name.upper():<4} output cosine mean {fmt(q.output_cosine)}  min {fmt(q.output_cosine_min)}",
            f"       task: {task_text(q.task)}",
        ]
    lines += ["", "ARM vs x86 (x86 is the reference)"]
    for precision in ("fp32", "int8"):
        q = report.arm_vs_x86[precision]
        worst = max(q.difference.items(), key=lambda kv: kv[1].max_abs)
        lines += [
            (
                f"  {precision.upper():<4} output cosine mean {fmt(q.output_cosine, 6)}  min "
                f"{fmt(q.output_cosine_min, 6)}  max abs {worst[1].max_abs:.3e} ({worst[0]})"
            ),
            f"       task: {task_text(q.task)}",
        ]
        if q.layer_cosine:
            ranked = sorted(q.layer_cosine.items(), key=lambda kv: kv[1])[:worst_layers]
            lines.append("       lowest per-layer cosine: " + ", ".join(f"{n} {fmt(v, 6)}" for n, v in ranked))
    ms = report.arm_ms_per_image
    lines += ["", f"ARM ms/image  FP32 {ms.fp32:.1f}  INT8 {ms.int8:.1f}  ({ms.note})"]
    return "\n".join(lines)
