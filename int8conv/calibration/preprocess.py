"""Calibration images -> NCHW float32 batches, preprocessed the way the model was trained.

Compatible with the original caffe-int8-convert-tools (``--mean M M M --norm N``: BGR pixels 0..255,
``(x - mean) * norm``, resized to the network input), extended with per-channel std, resize-then-center-crop,
letterboxing (keep the aspect ratio, pad bottom/right: RetinaFace), RGB/gray input and the H/W transpose that
Matlab-trained models (MTCNN) expect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from int8conv.errors import ImageError

T = TypeVar("T")

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
COLORS = ("bgr", "rgb", "gray")


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes one network input: ``(pixel - mean) * norm / std`` per channel."""

    size: tuple[int, int]  # network input (height, width)
    mean: tuple[float, ...] = (0.0,)
    norm: float = 1.0
    std: tuple[float, ...] = (1.0,)
    color: str = "bgr"
    resize: tuple[int, int] | None = None  # resize to (height, width) first, then center-crop to ``size``
    swap_hw: bool = False
    letterbox: bool = False  # fit inside ``size`` keeping the aspect ratio, pad bottom/right with 0

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ImageError(f"--color must be one of {', '.join(COLORS)}, not '{self.color}'")
        channels = 1 if self.color == "gray" else 3
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                counts = "1 value" if channels == 1 else f"1 or {channels} values"
                raise ImageError(f"--{label} needs {counts} for {self.color} input, got {len(values)}")
        if any(s == 0 for s in self.std):
            raise ImageError("--std values must be non-zero")
        if self.resize and (self.resize[0] < self.size[0] or self.resize[1] < self.size[1]):
            (height, width), (input_h, input_w) = self.resize, self.size
            raise ImageError(
                f"--resize-then-crop {height} {width} is smaller than the input size ({input_h}x{input_w}): "
                "the crop to the input size needs at least that"
            )
        if self.letterbox and (self.resize or self.swap_hw):
            raise ImageError("--letterbox cannot be combined with --resize-then-crop or --swap-hw")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def content_fraction(self, image_shape: tuple[int, ...]) -> tuple[float, float]:
        """The fraction (x, y) of the network input an image of ``image_shape`` (H, W, ...) fills: 1 unless
        letterboxed; input-normalized coordinates divided by it are image-normalized."""
        if not self.letterbox:
            return 1.0, 1.0
        height, width = _letterbox_size(image_shape, self.size)
        return width / self.size[1], height / self.size[0]

    def image_points(self, points: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
        """Input-normalized (x, y) points (..., 2) -> normalized to an image of ``image_shape`` (H, W, ...): undoes
        --swap-hw's transpose, --resize-then-crop's centre crop and --letterbox's padding."""
        points = np.asarray(points, dtype=np.float64)
        if self.swap_hw:  # the network saw the image transposed
            points = points[..., ::-1]
        out_h, out_w = self.size[::-1] if self.swap_hw else self.size
        if self.resize:
            resized_h, resized_w = self.resize[::-1] if self.swap_hw else self.resize
            crop = np.asarray([(resized_w - out_w) // 2, (resized_h - out_h) // 2])
            return (crop + points * [out_w, out_h]) / [resized_w, resized_h]
        return points / np.asarray(self.content_fraction(image_shape))

    def describe(self) -> dict:
        """A plain dict for saved statistics and reports (``letterbox`` only when set, so statistics saved
        before it existed still merge with new ones)."""
        described = asdict(self)
        if not self.letterbox:
            del described["letterbox"]
        return described

    def apply(self, image: np.ndarray) -> np.ndarray:
        """One decoded BGR uint8 image (HxWx3) -> CHW float32 network input."""
        if self.color == "gray":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif self.color == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        out_h, out_w = self.size
        if self.swap_hw:  # the network sees the image transposed, so prepare it at the transposed size
            out_h, out_w = out_w, out_h
        if self.resize:
            rh, rw = (self.resize[1], self.resize[0]) if self.swap_hw else self.resize
            image = _resize(image, rh, rw)
            top, left = (rh - out_h) // 2, (rw - out_w) // 2
            image = image[top : top + out_h, left : left + out_w]
        elif self.letterbox:
            height, width = _letterbox_size(image.shape, self.size)
            resized = _resize(image, height, width)
            image = np.zeros((out_h, out_w, resized.shape[2]), dtype=resized.dtype)
            image[:height, :width] = resized
        else:
            image = _resize(image, out_h, out_w)
        data = image.astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        scale = np.float32(self.norm) / np.asarray(self.std, dtype=np.float32)
        data = (data - mean) * scale
        chw = data.transpose(2, 0, 1)
        if self.swap_hw:
            chw = chw.transpose(0, 2, 1)
        return np.ascontiguousarray(chw, dtype=np.float32)


def _letterbox_size(image_shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image resized to fit inside ``size`` with its aspect ratio kept."""
    scale = min(size[0] / image_shape[0], size[1] / image_shape[1])
    return min(size[0], max(1, round(image_shape[0] * scale))), min(size[1], max(1, round(image_shape[1] * scale)))


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized if resized.ndim == 3 else resized[:, :, None]


def list_images(source: str | Path) -> list[Path]:
    """Images of a directory (recursive, jpg/jpeg/png/bmp in any case) or of a list file, sorted."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:  # one image, not a list of them
        return [source]
    if source.is_dir():
        paths = _folder_images(source)
    elif source.is_file():
        try:
            lines = source.read_text(encoding="utf-8-sig").splitlines()  # a BOM: Windows Notepad's lists
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageError(f"{source}: cannot read the image list: {exc}") from exc
        paths = []
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line)
                paths.append(path if path.is_absolute() else source.parent / path)
    else:
        raise ImageError(f"{source}: no such image directory or list file")
    if not paths:
        raise ImageError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _folder_images(folder: Path) -> list[Path]:
    """The images under ``folder``, sorted, symlinked subfolders included (``Path.rglob`` skips them silently);
    each real folder is read once, so a link back up does not loop."""
    seen: set[str] = set()
    paths = []
    for parent, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        paths += [Path(parent, name) for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(path for path in paths if path.is_file())


def unreadable(path: Path) -> str:
    """Why ``read_image`` gave nothing for ``path``, for the warning that skips it."""
    return "no such file" if not Path(path).exists() else "not a readable image"


def log_skipped(path: Path, reason: str) -> None:
    log.warning("skipping %s: %s", path, reason)


def read_image(path: Path) -> np.ndarray | None:
    """Decode an image as BGR uint8, or None when it is unreadable or corrupt."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


@dataclass
class ImageTally:
    """Which images were used and which were skipped, with the reason, for the end-of-run summary."""

    used: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def readable_images(paths: Iterable[Path], tally: ImageTally | None = None) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, BGR image) of each readable image; an unreadable one is skipped with a warning (and counted in
    ``tally``): the one image loop every stage reads images through."""
    for path in paths:
        image = read_image(path)
        if image is None:
            reason = unreadable(path)
            log_skipped(path, reason)
            if tally is not None:
                tally.skipped.append((path, reason))
            continue
        if tally is not None:
            tally.used += 1
        yield path, image


def iter_batches(
    paths: Sequence[Path], prep: Preprocess, batch_size: int, tally: ImageTally
) -> Iterator[tuple[np.ndarray, list[Path]]]:
    """Yield preprocessed batches; unreadable images are skipped with a warning and counted in ``tally``."""
    batch: list[np.ndarray] = []
    names: list[Path] = []
    for path, image in readable_images(paths, tally):
        batch.append(prep.apply(image))
        names.append(path)
        if len(batch) == batch_size:
            yield np.stack(batch), names
            batch, names = [], []
    if batch:
        yield np.stack(batch), names


def network_inputs(paths: Sequence[Path], prep: Preprocess, input_name: str) -> list[dict[str, np.ndarray]]:
    """One ``{input: CHW}`` per readable image (unreadable ones are skipped with a warning); none is an error."""
    inputs = [{input_name: prep.apply(image)} for _, image in readable_images(paths)]
    if not inputs:
        raise ImageError(f"none of the {len(paths)} images could be read")
    return inputs


def spread_evenly(items: Sequence[T], count: int) -> list[T]:
    """Up to ``count`` of ``items``, spread evenly over them (first and last included)."""
    if not items:
        return []
    picked = np.unique(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int))
    return [items[i] for i in picked]
