"""Decoding images of any common mode, and DICOM (``fpt.data.dicom``), into RGB float tensors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fpt.data.dicom import decode_dicom, dicom_pixel_count, is_dicom_file, read_dicom_header
from fpt.errors import FPTError

BOMB = "claims more pixels than PIL's decompression-bomb limit (a crafted or damaged header)"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
SUPPORTED_FORMATS = ".jpg .png .tif .bmp, DICOM (.dcm, or no suffix)"


def is_image_file(path: Path) -> bool:
    """True for visible files with an image suffix, and DICOM files (.dcm/.dicom, or no suffix and a DICOM
    header), so .DS_Store, Thumbs.db and notes are skipped."""
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


def load_image(path: str | Path) -> Tensor:
    """Decode ``path`` to an RGB float tensor [3, H, W] in [0, 1].

    Grayscale, palette, RGBA and CMYK images become RGB; 16-bit and floating-point images are scaled by
    their own minimum and maximum (their real range), not clipped to 8 bits.
    """
    return pixels_to_float(load_pixels(path))


def load_pixels(path: str | Path) -> Tensor:
    """Decode ``path`` to RGB [3, H, W]: uint8 for an 8-bit image, else float in [0, 1] (as ``load_image``).

    The views start from these: resizing 8-bit pixels is several times faster than resizing their float copy.
    """
    return torch.from_numpy(_decode(path)).permute(2, 0, 1)


def pixels_to_float(pixels: Tensor) -> Tensor:
    """[3, H, W] uint8 -> float32 in [0, 1]; a float tensor is returned as it is."""
    return pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels


def decode_rgb8(path: str | Path) -> np.ndarray | None:
    """The 8-bit RGB pixels [H, W, 3] of an image ``load_image`` would read as 8-bit, else None (16-bit and
    floating-point images are scaled by their own range instead). Raises as ``load_image`` does."""
    pixels = _decode(path)
    return pixels if pixels.dtype == np.uint8 else None


def pixel_count(path: Path) -> int:
    """Width × height of an image, from its header only (PIL's, or a DICOM's Rows and Columns)."""
    if is_dicom_file(path):
        return dicom_pixel_count(path)
    with Image.open(path) as image:
        return image.width * image.height


def _decode(path: str | Path) -> np.ndarray:
    """[H, W, 3]: uint8 for an 8-bit image, float32 in [0, 1] for a wide-mode one; a one-line error otherwise."""
    if is_dicom_file(Path(path)):
        return decode_dicom(path)
    try:
        with Image.open(path) as image:
            image.load()
            pixels = _rgb8(image)
            return pixels if pixels is not None else _to_rgb_array(image)
    except FileNotFoundError:
        raise FPTError(f"image not found: {path}") from None
    except PermissionError:
        raise FPTError(f"cannot read image {path}: permission denied; fix its permissions") from None
    except Image.DecompressionBombError:
        raise FPTError(f"image {path} {BOMB}; downscale it or replace it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise FPTError(f"cannot decode image {path} ({error}); replace it with a readable copy") from None


def unreadable_images(root: Path, keys: list[str]) -> dict[str, str]:
    """The images ``root / key`` whose header cannot be read, each with the reason (key -> reason): a cheap check,
    run on a few threads, that lists every unreadable file at once before any work starts."""

    def problem(key: str) -> str | None:
        if is_dicom_file(root / key):
            return _dicom_problem(root / key)
        try:
            with Image.open(root / key) as image:
                image.verify()  # reads the file without decoding it: PNG chunk checksums catch truncation
        except Image.DecompressionBombError:
            return BOMB
        except FileNotFoundError:
            return "not found"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            return str(error) or type(error).__name__
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(keys, pool.map(problem, keys), strict=True))
    return {key: reason for key, reason in found.items() if reason is not None}


def _dicom_problem(path: Path) -> str | None:
    try:
        read_dicom_header(path)
    except FPTError as error:
        return str(error)
    return None


WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # scaled by their own range, not by 255


def _rgb8(image: Image.Image) -> np.ndarray | None:
    """[H, W, 3] uint8 of an 8-bit image (palette, gray, RGBA and CMYK converted to RGB); None for a wide mode."""
    if image.mode in WIDE_MODES:
        return None
    if image.mode == "P":  # via RGBA, so palettes with transparency convert without a warning
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # writable, so it can back a tensor


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] of a wide-mode image, scaled by its own minimum and maximum."""
    gray = np.asarray(image, dtype=np.float32)
    low, high = float(gray.min()), float(gray.max())
    gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    return np.repeat(gray[:, :, None], 3, axis=2)
