"""`load_image`: every common file format and pixel mode becomes an RGB float tensor [3, H, W] in [0, 1]."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fpt.data.images import BOMB, is_image_file, load_image, unreadable_images
from fpt.errors import FPTError

# a 5 x 7 RGB picture (height != width, so a transposed result cannot pass)
RGB = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3) * 2


def expected_rgb(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float in [0, 1]."""
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)


def assert_rgb_tensor(image: torch.Tensor, height: int, width: int) -> None:
    assert image.dtype == torch.float32
    assert image.shape == (3, height, width)
    assert image.min() >= 0.0
    assert image.max() <= 1.0


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".bmp"])
def test_lossless_rgb_formats_decode_exactly(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    Image.fromarray(RGB).save(path)
    image = load_image(path)
    assert_rgb_tensor(image, 5, 7)
    torch.testing.assert_close(image, expected_rgb(RGB), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_decodes_to_close_values(tmp_path: Path, suffix: str) -> None:
    # flat colours survive JPEG compression almost exactly
    array = np.zeros((16, 24, 3), dtype=np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = 200, 100, 50
    path = tmp_path / f"image{suffix}"
    Image.fromarray(array).save(path, quality=95)
    image = load_image(path)
    assert_rgb_tensor(image, 16, 24)
    torch.testing.assert_close(image, expected_rgb(array), rtol=0, atol=3 / 255)


def test_accepts_a_string_path(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(RGB).save(path)
    torch.testing.assert_close(load_image(str(path)), expected_rgb(RGB), rtol=0, atol=1e-6)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.array([[0, 51, 102], [153, 204, 255]], dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    image = load_image(path)
    assert_rgb_tensor(image, 2, 3)
    for channel in range(3):
        torch.testing.assert_close(image[channel], torch.from_numpy(gray / 255.0).float(), rtol=0, atol=1e-6)


def test_rgba_keeps_the_colour_and_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([RGB, np.full((5, 7, 1), 128, dtype=np.uint8)], axis=2)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = load_image(path)
    assert_rgb_tensor(image, 5, 7)
    torch.testing.assert_close(image, expected_rgb(RGB), rtol=0, atol=1e-6)


def make_palette_image() -> Image.Image:
    """4 x 2 palette image: row 0 = red, green, blue, red; row 1 = blue, blue, green, red."""
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2, 0, 2, 2, 1, 0])
    return image


PALETTE_RGB = np.array(
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 0]], [[0, 0, 255], [0, 0, 255], [0, 255, 0], [255, 0, 0]]],
    dtype=np.uint8,
)


def test_palette_image_becomes_its_colours(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    make_palette_image().save(path)
    assert Image.open(path).mode == "P"
    image = load_image(path)
    assert_rgb_tensor(image, 2, 4)
    torch.testing.assert_close(image, expected_rgb(PALETTE_RGB), rtol=0, atol=1e-6)


def test_palette_with_transparency_becomes_rgb_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "palette_transparent.png"
    make_palette_image().save(path, transparency=0)  # palette entry 0 (red) is transparent
    assert "transparency" in Image.open(path).info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette with transparency goes straight to RGB
        image = load_image(path)
    assert_rgb_tensor(image, 2, 4)
    torch.testing.assert_close(image, expected_rgb(PALETTE_RGB), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_image_is_scaled_by_its_real_range_not_clipped(tmp_path: Path, suffix: str) -> None:
    # values 1000..5000: min -> 0, max -> 1, and linear in between (3000 -> 0.5, 2000 -> 0.25, 4500 -> 0.875)
    values = np.array([[1000, 3000, 5000], [2000, 4500, 1000]], dtype=np.uint16)
    path = tmp_path / f"sixteen{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert_rgb_tensor(image, 2, 3)
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.875, 0.0]])
    for channel in range(3):
        torch.testing.assert_close(image[channel], expected, rtol=0, atol=1e-6)


def test_16_bit_values_above_255_are_not_saturated(tmp_path: Path) -> None:
    # clipping to 8 bits would make every pixel 1.0; scaling keeps them apart
    values = np.array([[300, 40000], [60000, 20000]], dtype=np.uint16)
    path = tmp_path / "bright.png"
    Image.fromarray(values).save(path)
    image = load_image(path)[0]
    expected = (values.astype(np.float64) - 300) / (60000 - 300)
    torch.testing.assert_close(image, torch.from_numpy(expected).float(), rtol=0, atol=1e-6)


def test_float_tiff_is_scaled_by_its_real_range(tmp_path: Path) -> None:
    values = np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    image = load_image(path)
    assert_rgb_tensor(image, 2, 2)
    expected = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    for channel in range(3):
        torch.testing.assert_close(image[channel], expected, rtol=0, atol=1e-6)


def test_constant_16_bit_image_gives_zeros_not_nan(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((3, 3), 1234, dtype=np.uint16)).save(path)
    image = load_image(path)
    assert torch.isfinite(image).all()
    assert torch.equal(image, torch.zeros(3, 3, 3))


def test_truncated_png_raises_fpt_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FPTError, match=r"broken\.png") as error:
        load_image(path)
    assert str(path) in str(error.value)
    assert "replace it with a readable copy" in str(error.value)


def test_file_that_is_not_an_image_raises_fpt_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a JPEG")
    with pytest.raises(FPTError, match=r"fake\.jpg"):
        load_image(path)


def test_missing_file_raises_fpt_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(FPTError, match="not found") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_unreadable_path_raises_fpt_error(tmp_path: Path) -> None:
    path = tmp_path / "folder.png"  # a directory cannot be read as a file (permissions do not stop root)
    path.mkdir()
    with pytest.raises(FPTError, match=r"folder\.png"):
        load_image(path)


@pytest.mark.parametrize(
    ("name", "is_image"),
    [
        ("a.jpg", True),
        ("a.JPEG", True),
        ("a.png", True),
        ("a.tif", True),
        ("a.TIFF", True),
        ("a.bmp", True),
        (".DS_Store", False),
        ("Thumbs.db", False),
        ("notes.txt", False),
        ("._a.png", False),  # macOS resource fork next to a.png
        ("a.png.txt", False),
    ],
)
def test_is_image_file(name: str, is_image: bool) -> None:
    assert is_image_file(Path(name)) is is_image


def test_a_decompression_bomb_is_one_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())  # a real PNG whose header now claims 40000 x 40000 pixels
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(FPTError, match=r"image .*bomb\.png claims more pixels than PIL's decompression-bomb limit"):
        load_image(path)
    assert unreadable_images(tmp_path, ["bomb.png"]) == {"bomb.png": BOMB}


def test_unreadable_images_lists_every_unreadable_file_with_its_reason(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    (tmp_path / "text.png").write_text("not an image")
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])

    found = unreadable_images(tmp_path, ["good.png", "text.png", "truncated.png", "absent.png"])

    assert sorted(found) == ["absent.png", "text.png", "truncated.png"]
    assert found["absent.png"] == "not found"
