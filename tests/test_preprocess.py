"""Preprocessing against OpenCV's blobFromImage, plus image discovery and bad images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from int8conv.calibration.preprocess import ImageTally, Preprocess, iter_batches, list_images, read_image
from int8conv.errors import ImageError

RNG = np.random.default_rng(2)


@pytest.fixture
def image_dir(tmp_path):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "B.JPEG", "sub/c.Png", "d.bmp"]):
        cv2.imwrite(str(images / name), RNG.integers(0, 255, size=(40 + i, 50, 3), dtype=np.uint8))
    (images / "notes.txt").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    (images / "empty.png").write_bytes(b"")
    return images


def test_matches_blob_from_image(image_dir):
    image = read_image(image_dir / "a.jpg")
    prep = Preprocess(size=(30, 20), mean=(104, 117, 123), norm=0.5)
    expected = cv2.dnn.blobFromImage(image, 0.5, (20, 30), (104, 117, 123))[0]
    np.testing.assert_allclose(prep.apply(image), expected, rtol=1e-5, atol=1e-4)


def test_rgb_std_and_center_crop(image_dir):
    image = read_image(image_dir / "a.jpg")
    prep = Preprocess(size=(24, 24), mean=(127, 127, 127), std=(128, 64, 32), color="rgb", resize=(32, 32))
    resized = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (32, 32)).astype(np.float32)
    crop = resized[4:28, 4:28]
    expected = ((crop - 127) / np.array([128, 64, 32], np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(prep.apply(image), expected, rtol=1e-5, atol=1e-5)


def test_gray_and_swap_hw(image_dir):
    image = read_image(image_dir / "a.jpg")
    gray = Preprocess(size=(28, 28), norm=1 / 256, color="gray").apply(image)
    assert gray.shape == (1, 28, 28)
    np.testing.assert_allclose(gray[0], cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (28, 28)) / 256, atol=1e-6)
    swapped = Preprocess(size=(12, 16), swap_hw=True).apply(image)
    plain = cv2.resize(image, (12, 16)).astype(np.float32).transpose(2, 1, 0)  # HWC -> C W H
    assert swapped.shape == (3, 12, 16)
    np.testing.assert_allclose(swapped, plain)


def test_list_images_recursive_any_case(image_dir):
    paths = list_images(image_dir)
    assert paths == sorted(paths)
    assert {p.name for p in paths} == {"a.jpg", "B.JPEG", "broken.jpg", "c.Png", "d.bmp", "empty.png"}


def test_list_images_follows_symlinked_folders_once(image_dir, tmp_path):
    """A calibration folder assembled from links to other folders: their images count, and a link back up to the
    folder itself neither loops nor lists an image twice."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cv2.imwrite(str(elsewhere / "e.jpg"), RNG.integers(0, 255, size=(20, 20, 3), dtype=np.uint8))
    (image_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    (image_dir / "sub" / "up").symlink_to(image_dir, target_is_directory=True)
    names = [p.name for p in list_images(image_dir)]
    assert sorted(names) == ["B.JPEG", "a.jpg", "broken.jpg", "c.Png", "d.bmp", "e.jpg", "empty.png"]
    assert image_dir / "linked" / "e.jpg" in list_images(image_dir)


def test_list_file_relative_paths(image_dir):
    listing = image_dir / "list.txt"
    listing.write_text("# calibration set\na.jpg\n\nsub/c.Png\n")
    assert list_images(listing) == [image_dir / "a.jpg", image_dir / "sub" / "c.Png"]
    listing.write_bytes(b"\xef\xbb\xbfa.jpg\r\nsub/c.Png\r\n")  # saved by Windows Notepad: a BOM, CRLF
    assert list_images(listing) == [image_dir / "a.jpg", image_dir / "sub" / "c.Png"]


def test_unreadable_images_are_skipped_and_counted(image_dir):
    tally = ImageTally()
    batches = list(iter_batches(list_images(image_dir), Preprocess(size=(8, 8)), 3, tally))
    assert tally.used == 4 and sorted(p.name for p, _ in tally.skipped) == ["broken.jpg", "empty.png"]
    assert [b.shape[0] for b, _ in batches] == [3, 1]


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(ImageError, match="no such image"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(ImageError, match="--mean"):
        Preprocess(size=(8, 8), mean=(1, 2))


def test_letterbox_keeps_the_aspect_ratio_and_pads_bottom_right(image_dir):
    """RetinaFace's preprocessing: fit inside the input, zeros below and to the right (raw RGB, no mean)."""
    image = read_image(image_dir / "a.jpg")  # 40 x 50 (H x W)
    prep = Preprocess(size=(32, 32), color="rgb", letterbox=True)
    fitted = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (32, 26), interpolation=cv2.INTER_LINEAR)
    expected = cv2.copyMakeBorder(fitted, 0, 6, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    np.testing.assert_array_equal(prep.apply(image), expected.transpose(2, 0, 1).astype(np.float32))
    assert prep.content_fraction(image.shape) == (1.0, 26 / 32)
    assert Preprocess(size=(32, 32)).content_fraction(image.shape) == (1.0, 1.0)
    with pytest.raises(ImageError, match="--letterbox"):
        Preprocess(size=(32, 32), letterbox=True, swap_hw=True)
