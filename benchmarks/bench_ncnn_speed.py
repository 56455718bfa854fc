"""ncnn FP32 vs INT8 speed (median ms per image), side by side in one run, with the INT8/FP32 ratio.

For each model: convert to ncnn FP32, calibrate (KL) on a few images, quantize, then time both files in the
same process, interleaved run by run so that machine load hits both alike, for 1 and 2 threads.

    python benchmarks/bench_ncnn_speed.py [--shared ../shared] [--models open_nsfw res10_ssd] [--runs 20]

ncnn's own INT8 models of res10 SSD and open_nsfw ran at 0.59-0.60 of FP32 time (one thread) on this CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8conv.caffe.graph import load_graph  # noqa: E402
from int8conv.calibration.calibrate import build_table, collect_statistics, model_identity  # noqa: E402
from int8conv.calibration.preprocess import Preprocess, list_images, read_image  # noqa: E402
from int8conv.engines import make_engine  # noqa: E402
from int8conv.ncnn.convert import convert_graph  # noqa: E402
from int8conv.ncnn.model import write_model  # noqa: E402
from int8conv.ncnn.quantize import int8_layers, quantize_model  # noqa: E402
from int8conv.ncnn.runtime import time_models  # noqa: E402

#: name -> (folder, prototxt, caffemodel, preprocessing, calibration image folder)
MODELS = {
    "open_nsfw": ("open_nsfw_resnet50_1by2", "deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel",
                  Preprocess(size=(224, 224), mean=(104, 117, 123), resize=(256, 256)), "imagenet_samples_200"),
    "res10_ssd": ("res10_300x300_ssd", "deploy.prototxt", "res10_300x300_ssd_iter_140000.caffemodel",
                  Preprocess(size=(300, 300), mean=(104, 177, 123)), "voc_coco_detection"),
    "yufacedetectnet_v1": ("yufacedetectnet_v1", "yufacedetectnet-open-v1.prototxt",
                           "yufacedetectnet-open-v1.caffemodel", Preprocess(size=(240, 320)), "voc_coco_detection"),
    "ultraface_slim320": ("ultraface_slim320", "slim-320.prototxt", "slim-320.caffemodel",
                          Preprocess(size=(240, 320), mean=(127,), norm=1 / 128, color="rgb"), "voc_coco_detection"),
}


def build(shared: Path, name: str, out: Path, images: int) -> tuple[Path, Path, Path, Path, dict, int]:
    """FP32 and INT8 ncnn files of one model, and one preprocessed input to time them on."""
    folder, proto, caffemodel, prep, image_dir = MODELS[name]
    base = shared / "models" / folder
    graph = load_graph(base / proto, base / caffemodel)
    paths = list_images(shared / "images" / image_dir)[:images]
    engine = make_engine("opencv", graph, base / proto, base / caffemodel)
    stats = collect_statistics(graph, engine, paths, prep, model_identity(base / proto, base / caffemodel))
    fp32 = convert_graph(graph)
    int8 = quantize_model(fp32, build_table(graph, stats, "kl").table)
    files = out / f"{name}.param", out / f"{name}.bin", out / f"{name}-int8.param", out / f"{name}-int8.bin"
    write_model(fp32, files[0], files[1])
    write_model(int8, files[2], files[3])
    inputs = {fp32.input_names[0]: prep.apply(read_image(list_images(shared / "images" / "faces")[0]))}
    return (*files, inputs, len(int8_layers(int8)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["open_nsfw", "res10_ssd"])
    parser.add_argument("--runs", type=int, default=20, help="timed passes per model and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calibration-images", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("INT8CONV_QUIET", "1")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"median of {args.runs} runs after 2 warm-up runs")
    print(f"{'model':<20} {'INT8 layers':>11} {'threads':>7} {'FP32 ms':>9} {'INT8 ms':>9} {'INT8/FP32':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp32_param, fp32_bin, int8_param, int8_bin, inputs, count = build(args.shared, name, Path(tmp),
                                                                              args.calibration_images)
            speed = time_models({"fp32": (fp32_param, fp32_bin, False), "int8": (int8_param, int8_bin, True)},
                                inputs, threads=args.threads, runs=args.runs)
            for threads in args.threads:
                fp32_ms, int8_ms = speed["fp32"][threads], speed["int8"][threads]
                print(f"{name:<20} {count:>11} {threads:>7} {fp32_ms:>9.2f} {int8_ms:>9.2f} {int8_ms / fp32_ms:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
