"""DICOM images: stored values to display values the way a radiology viewer shows them, as RGB arrays.

Greyscale images go through the modality transform (rescale slope/intercept or a Modality LUT: Hounsfield units
for CT), then the first VOI transform the file carries (a VOI LUT, else window centre/width with its VOI LUT
function), mapped to [0, 1]; without either they are scaled by their own minimum and maximum, like a 16-bit TIFF.
MONOCHROME1 is inverted (its low values are white). The full stored range is kept in float32 until that mapping.
Colour images (RGB, YBR — converted by pydicom —, PALETTE COLOR) stay 8-bit RGB when they are 8-bit. Compressed
transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom's pylibjpeg plugins. Multi-frame files
are refused: fpt classifies single images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fpt.errors import FPTError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_PREAMBLE = 128  # bytes before the "DICM" marker of a DICOM Part 10 file
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_dicom_file(path: Path) -> bool:
    """True for a .dcm/.dicom file, or a file without a suffix that starts like a DICOM Part 10 file (scanners
    often write files named IM0001 with no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    # no suffix, or the last number of a UID-named file (1.2.840.113619.2.55.3.604688119.7)
    if (path.suffix and not path.suffix[1:].isdigit()) or not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            return file.read(_PREAMBLE + 4)[_PREAMBLE:] == b"DICM"
    except OSError:
        return False


def decode_dicom(path: str | Path) -> np.ndarray:
    """[H, W, 3]: uint8 for 8-bit colour, float32 in [0, 1] otherwise; a one-line error naming the file."""
    dataset = read_dicom_header(path)
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises RuntimeError/NotImplementedError/ValueError from its decoders
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        reason = " ".join(str(error).split())[:300] or type(error).__name__  # pydicom's messages span lines
        raise FPTError(
            f"cannot decode the pixel data of DICOM {path} ({getattr(syntax, 'name', syntax)}: {reason}); convert it "
            "to uncompressed DICOM (e.g. `gdcmconv --raw`) or install python-gdcm"
        ) from None
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, dataset)  # uint8 or uint16, as the palette's entries
        return _colour(rgb, 8 * rgb.dtype.itemsize)
    if pixels.ndim == 3:  # RGB, or YBR that pydicom has converted to RGB
        return _colour(pixels, int(dataset.get("BitsStored", 8)))
    try:
        shown = _monochrome(dataset, pixels, photometric)
    except FPTError as error:
        raise FPTError(f"DICOM {path}: {error}") from None
    return np.repeat(shown[:, :, None], 3, axis=2)


def dicom_pixel_count(path: Path) -> int:
    """Rows × Columns of a DICOM image, from its header only (the pixel data is not read)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Rows) * int(header.Columns)
    except Exception as error:  # pydicom's InvalidDicomError, a missing Rows: read as a damaged file
        raise FPTError(f"cannot read the header of DICOM {path} ({error})") from None


def read_dicom_header(path: str | Path):
    """The pydicom dataset of ``path``, its pixel data not yet decoded; a one-line error for a file that is no
    DICOM image or holds more than one frame."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
    except FileNotFoundError:
        raise FPTError(f"image not found: {path}") from None
    except PermissionError:
        raise FPTError(f"cannot read image {path}: permission denied; fix its permissions") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise FPTError(f"cannot read DICOM {path} ({error}); replace it with a readable copy") from None
    if not any(name in dataset for name in PIXEL_DATA):
        kind = dataset.get("Modality") or dataset.get("SOPClassUID", "unknown")
        raise FPTError(f"DICOM {path} holds no image (modality {kind}); list only image files")
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        if "PixelData" in dataset and syntax is not None and not syntax.is_compressed:  # its length is known
            from pydicom.pixels.utils import get_expected_length

            expected = get_expected_length(dataset, "bytes")
            if len(dataset.PixelData) < expected:
                raise FPTError(
                    f"DICOM {path} is truncated: {len(dataset.PixelData)} bytes of pixel data where its header "
                    f"says {expected}; replace it with a complete copy"
                )
    except FPTError:
        raise
    except Exception as error:  # a malformed header: a missing Rows, a non-numeric NumberOfFrames
        raise FPTError(f"DICOM {path} has a malformed image header ({type(error).__name__}: {error})") from None
    if frames > 1:
        raise FPTError(
            f"DICOM {path} has {frames} frames; fpt classifies single images: export the frame you need as its own "
            "file (e.g. with pydicom or `dcmtk`), one file per image"
        )
    return dataset


def _colour(pixels: np.ndarray, bits: int) -> np.ndarray:
    """RGB pixels [H, W, 3]: uint8 as they are when 8-bit, else float32 scaled by the largest stored value."""
    if pixels.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(pixels)
    return (pixels.astype(np.float32) / float(2**bits - 1)).clip(0.0, 1.0)


def _monochrome(dataset, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """[H, W] float32 in [0, 1]: modality transform, then VOI (LUT, window or the image's own range)."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(pixels, dataset).astype(np.float32)
    padding = _padding_mask(dataset, pixels)
    if dataset.get("VOILUTSequence"):
        shown = _voi_lut(values, dataset.VOILUTSequence[0])
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        shown = _window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth), dataset)
    else:  # the image's own range, without the padding outside the scanned area
        inside = values[~padding] if padding is not None and not padding.all() else values
        low, high = float(inside.min()), float(inside.max())
        shown = (values - low) / (high - low) if high > low else np.zeros_like(values)
    shown = shown.clip(0.0, 1.0)
    inverted = photometric == "MONOCHROME1" or str(dataset.get("PresentationLUTShape", "")).upper() == "INVERSE"
    shown = 1.0 - shown if inverted else shown
    if padding is not None:
        shown[padding] = 0.0  # padding is shown black, whatever the window
    return shown


def _padding_mask(dataset, pixels: np.ndarray) -> np.ndarray | None:
    """Where the stored values are Pixel Padding Value (outside the scanned area), or None."""
    if "PixelPaddingValue" not in dataset:
        return None
    padding = int(dataset.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in dataset:
        low, high = sorted((padding, int(dataset.PixelPaddingRangeLimit)))
        return (pixels >= low) & (pixels <= high)
    return pixels == padding


def _voi_lut(values: np.ndarray, item) -> np.ndarray:
    """A VOI LUT table (PS3.3 C.11.2.1.1): values below/above its first/last entry take that entry; onto [0, 1]
    by the entries' bit depth."""
    entries, first, bits = (int(n) for n in item.LUTDescriptor)
    data = item.LUTData  # a list of numbers (VR US), one number, or 16-bit words (VR OW)
    if isinstance(data, bytes):
        table = np.frombuffer(data, dtype="<u2").astype(np.float64)
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.float64))
    entries = entries or 65536  # 0 means 2**16 entries
    index = np.clip(np.rint(values.astype(np.float64)) - first, 0, min(entries, len(table)) - 1).astype(np.int64)
    return (table[index] / float(2**bits - 1)).astype(np.float32)


def _first(value) -> float:
    """Window centre/width may be multi-valued (several windows): the first is the default view."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _window(values: np.ndarray, centre: float, width: float, dataset) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2: the VOI LUT function (LINEAR, LINEAR_EXACT or SIGMOID) onto [0, 1]."""
    function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
    if width <= 0:
        raise FPTError(f"DICOM window width {width} is not positive")
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return (values - centre) / width + 0.5
    if width <= 1:  # a threshold at the centre (a width below 1 is invalid for LINEAR; read as 1)
        return (values > centre - 0.5).astype(np.float32)
    return (values - (centre - 0.5)) / (width - 1.0) + 0.5
