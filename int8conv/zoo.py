"""The known models: the real models of ``../shared/models`` with the preprocessing their SOURCE.txt gives.

One registry for the tests, demos, benchmarks and scripts; the models themselves stay in ``../shared``
(or ``$INT8CONV_SHARED``), next to a checkout.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from int8conv.calibration.preprocess import Preprocess
from int8conv.errors import Int8ConvError

#: the checkout the package runs from; ``../shared`` is looked for beside it
REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared() -> Path | None:
    """``$INT8CONV_SHARED`` or ``../shared`` beside the checkout, when it holds ``models/``."""
    candidate = Path(os.environ.get("INT8CONV_SHARED", REPO_ROOT.parent / "shared"))
    return candidate if (candidate / "models").is_dir() else None


def shared_dir() -> Path:
    """The shared folder, or an error that says how to point at it."""
    path = find_shared()
    if path is None:
        raise Int8ConvError(
            "the shared models were not found in ../shared: set INT8CONV_SHARED, or give --proto and --model"
        )
    return path


@dataclass(frozen=True)
class SharedModel:
    folder: str
    proto: str
    caffemodel: str
    prep: Preprocess

    def paths(self, shared: Path) -> tuple[Path, Path]:
        base = shared / "models" / self.folder
        return base / self.proto, base / self.caffemodel

    def with_size(self, height: int, width: int) -> SharedModel:
        """The same model fed at another input size (fully convolutional nets)."""
        return dataclasses.replace(self, prep=dataclasses.replace(self.prep, size=(height, width)))


_MTCNN = {"mean": (127.5,), "norm": 0.0078125, "color": "rgb", "swap_hw": True}
MODELS = {
    "lenet": SharedModel(
        "lenet_mnist",
        "lenet.prototxt",
        "lenet_iter_10000.caffemodel",
        Preprocess(size=(28, 28), norm=0.00390625, color="gray"),
    ),
    "det1": SharedModel("mtcnn", "det1.prototxt", "det1.caffemodel", Preprocess(size=(12, 12), **_MTCNN)),
    "det2": SharedModel("mtcnn", "det2.prototxt", "det2.caffemodel", Preprocess(size=(24, 24), **_MTCNN)),
    "det3": SharedModel("mtcnn", "det3.prototxt", "det3.caffemodel", Preprocess(size=(48, 48), **_MTCNN)),
    "det4": SharedModel("mtcnn", "det4.prototxt", "det4.caffemodel", Preprocess(size=(24, 24), **_MTCNN)),
    "open_nsfw": SharedModel(
        "open_nsfw_resnet50_1by2",
        "deploy.prototxt",
        "resnet_50_1by2_nsfw.caffemodel",
        Preprocess(size=(224, 224), mean=(104, 117, 123), resize=(256, 256)),
    ),
    "res10": SharedModel(
        "res10_300x300_ssd",
        "deploy.prototxt",
        "res10_300x300_ssd_iter_140000.caffemodel",
        Preprocess(size=(300, 300), mean=(104, 177, 123)),
    ),
    "ultraface": SharedModel(
        "ultraface_slim320",
        "slim-320.prototxt",
        "slim-320.caffemodel",
        Preprocess(size=(240, 320), mean=(127,), norm=1 / 128, color="rgb"),
    ),
    "yufacedetectnet": SharedModel(
        "yufacedetectnet_v1",
        "yufacedetectnet-open-v1.prototxt",
        "yufacedetectnet-open-v1.caffemodel",
        Preprocess(size=(240, 320)),
    ),
    # models with Caffe-fork layers
    "retinaface": SharedModel(
        "retinaface_mnet025",
        "mnet-deconv-0517.prototxt",
        "mnet-deconv-0517.caffemodel",
        Preprocess(size=(320, 320), color="rgb", letterbox=True),
    ),
    "yoloface": SharedModel(
        "yoloface_500k_v2",
        "yoloface-500k-v2.prototxt",
        "yoloface-500k-v2.caffemodel",
        Preprocess(size=(288, 352), norm=1 / 255, color="rgb"),
    ),
    "shufflenet_driver": SharedModel(
        "shufflenet_v1_driver_action",
        "shufflenet_l20_50_deploy.prototxt",
        "shufflenet_l20_50.caffemodel",
        Preprocess(size=(50, 50), mean=(103.94, 116.78, 123.68), norm=0.017),
    ),
    "lane": SharedModel(
        "mobilenet_yolov3_lite_lane",
        "mobilenet_yolov3_lite_deploy.prototxt",
        "mobilenet_yolov3_lite_deploy_iter_50000.caffemodel",
        Preprocess(size=(512, 512), mean=(127.5,), norm=0.007843),
    ),
}
#: The models above whose layers come from Caffe forks (Upsample, ShuffleChannel, depthwise type names, ...).
FORK_MODELS = ("retinaface", "yoloface", "shufflenet_driver", "lane")


def cli_flags(prep: Preprocess) -> list[str]:
    """The ``calibrate`` preprocessing flags that give ``prep`` (the input size comes from the prototxt)."""
    flags = [
        "--mean",
        *map(str, prep.mean),
        "--norm",
        repr(prep.norm),
        "--std",
        *map(str, prep.std),
        "--color",
        prep.color,
    ]
    if prep.resize:
        flags += ["--resize-then-crop", *map(str, prep.resize)]
    return flags + (["--swap-hw"] if prep.swap_hw else []) + (["--letterbox"] if prep.letterbox else [])


def model_input(prep: Preprocess, image: np.ndarray, channels: int) -> np.ndarray:
    """One network input from an image; det4's 15 channels are five 24x24 RGB crops of it."""
    if channels != 15:
        return prep.apply(image)
    h, w = image.shape[:2]
    crops = [
        image[y : y + h // 3, x : x + w // 3]
        for y, x in [(0, 0), (0, w // 3), (h // 3, 0), (h // 3, w // 3), (h // 2, w // 2)]
    ]
    return np.concatenate([prep.apply(c) for c in crops])


def write_digit_cells(digits_png: Path, out_dir: Path, count: int, offset: int = 0) -> Path:
    """Cut ``count`` of OpenCV's 5000 handwritten digits (20x20 cells) into 28x28 MNIST-style PNGs.

    ``digits.png`` holds 50 rows of 100 cells, 5 rows per digit 0..9; cells are taken evenly over all 5000
    (starting at ``offset``) so every digit appears. Each cell is padded by 4 pixels, as MNIST centers its
    20x20 digits in 28x28.
    """
    sheet = cv2.imread(str(digits_png), cv2.IMREAD_GRAYSCALE)
    if sheet is None or sheet.shape != (1000, 2000):
        raise Int8ConvError(f"{digits_png}: not OpenCV's digits.png (2000x1000 grayscale)")
    out_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, 5000 // max(count, 1))
    for index in range(offset, offset + step * count, step):
        row, col = divmod(index % 5000, 100)
        cell = cv2.copyMakeBorder(
            sheet[row * 20 : (row + 1) * 20, col * 20 : (col + 1) * 20], 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=0
        )
        cv2.imwrite(str(out_dir / f"digit{row // 5}_{index:04d}.png"), cell)
    return out_dir
