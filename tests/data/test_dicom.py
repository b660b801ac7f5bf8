"""DICOM images: real files shipped with pydicom's test data (CT, MR in four transfer syntaxes, nuclear medicine in
JPEG 2000 and JPEG Extended, palette ultrasound, RGB secondary captures, multi-frame files) and a few edge cases
written from them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from fpt.cli import main
from fpt.data.datasets import load_dataset
from fpt.data.dicom import is_dicom_file
from fpt.data.images import load_image, unreadable_images
from fpt.errors import FPTError
from tests.pipeline_fixtures import cli_model_args, cli_run_args, one_line_error

pytest_plugins = ("tests.pipeline_fixtures",)


def _real(name: str) -> Path:
    return Path(get_testdata_file(name))


def test_ct_is_in_hounsfield_units_scaled_by_its_own_range() -> None:
    """CT_small: rescale intercept −1024, no window: the HU image's own minimum and maximum become 0 and 1."""
    dataset = pydicom.dcmread(_real("CT_small.dcm"))
    hounsfield = apply_modality_lut(dataset.pixel_array, dataset).astype(np.float32)
    assert float(dataset.RescaleIntercept) == -1024 and "WindowCenter" not in dataset

    image = load_image(_real("CT_small.dcm"))

    expected = (hounsfield - hounsfield.min()) / (hounsfield.max() - hounsfield.min())
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    torch.testing.assert_close(image[0], torch.from_numpy(expected))
    torch.testing.assert_close(image[1], image[0])
    assert len(torch.unique(image[0])) > 256  # 16-bit: more grey levels than an 8-bit conversion would keep


def test_mr_window_centre_and_width_match_pydicom_s_linear_window() -> None:
    """MR_small carries window 600/1600: the same mapping as pydicom's VOI transform, onto [0, 1] instead of the
    stored 16-bit signed range."""
    dataset = pydicom.dcmread(_real("MR_small.dcm"))
    windowed = apply_voi_lut(dataset.pixel_array.astype(np.float64), dataset)
    low, high = -(2**15), 2**15 - 1  # pydicom's output range for signed 16-bit stored values

    image = load_image(_real("MR_small.dcm"))

    expected = torch.from_numpy(((windowed - low) / (high - low)).astype(np.float32))
    torch.testing.assert_close(image[0], expected, atol=1e-4, rtol=0)
    assert 0.2 < float(image.min()) < 0.21  # the darkest tissue sits inside the window, not at black


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_compressed_transfer_syntaxes_decode_to_the_uncompressed_image(compressed: str) -> None:
    torch.testing.assert_close(load_image(_real(compressed)), load_image(_real("MR_small.dcm")), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm"])
def test_nuclear_medicine_without_a_window_is_scaled_by_its_own_range(name: str) -> None:
    dataset = pydicom.dcmread(_real(name))
    stored = dataset.pixel_array.astype(np.float32)
    image = load_image(_real(name))
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    torch.testing.assert_close(image[0], torch.from_numpy(expected))


def test_palette_colour_ultrasound_goes_through_its_colour_lookup_table() -> None:
    dataset = pydicom.dcmread(_real("examples_palette.dcm"))
    rgb = apply_color_lut(dataset.pixel_array, dataset)
    assert rgb.dtype == np.uint16  # 16-bit palette entries
    image = load_image(_real("examples_palette.dcm"))
    torch.testing.assert_close(image, torch.from_numpy(rgb.astype(np.float32) / 65535).permute(2, 0, 1))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_rle.dcm"])
def test_eight_bit_colour_stays_eight_bit_rgb(name: str) -> None:
    dataset = pydicom.dcmread(_real(name))
    image = load_image(_real(name))
    torch.testing.assert_close(image, torch.from_numpy(dataset.pixel_array.astype(np.float32) / 255).permute(2, 0, 1))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_real("MR_small.dcm"))
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "inverted.dcm")
    torch.testing.assert_close(load_image(tmp_path / "inverted.dcm"), 1 - load_image(_real("MR_small.dcm")))


@pytest.mark.parametrize(("function", "expected_at_centre"), [("LINEAR_EXACT", 0.5), ("SIGMOID", 0.5)])
def test_voi_lut_functions_map_the_window_centre_to_mid_grey(
    tmp_path: Path, function: str, expected_at_centre: float
) -> None:
    dataset = pydicom.dcmread(_real("MR_small.dcm"))
    pixels = np.full((64, 64), 600, dtype=np.int16)
    pixels[0, 0], pixels[0, 1] = 0, 3000
    dataset.PixelData = pixels.tobytes()
    dataset.VOILUTFunction = function
    dataset.save_as(tmp_path / "window.dcm")
    image = load_image(tmp_path / "window.dcm")
    assert float(image[0, 5, 5]) == pytest.approx(expected_at_centre, abs=1e-6)
    assert float(image[0, 0, 0]) < 0.3 and float(image[0, 0, 1]) > 0.7


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SC_rgb_rle_2frame.dcm", "has 2 frames; fpt classifies single images"),
        ("rtplan.dcm", "holds no image (modality RTPLAN)"),
        ("JPEG-lossy.dcm", "cannot decode the pixel data of DICOM"),
    ],
)
def test_files_fpt_cannot_classify_are_one_line_errors_naming_them(name: str, expected: str) -> None:
    with pytest.raises(FPTError, match=re.escape(expected)) as error:
        load_image(_real(name))
    assert name in str(error.value) and "\n" not in str(error.value)


def test_truncated_and_non_dicom_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "truncated.dcm").write_bytes(_real("MR_small.dcm").read_bytes()[:3000])
    (tmp_path / "text.dcm").write_text("not a DICOM file")
    for name in ("truncated.dcm", "text.dcm"):
        with pytest.raises(FPTError, match=rf"{name}"):
            load_image(tmp_path / name)
    assert set(unreadable_images(tmp_path, ["truncated.dcm", "text.dcm"])) == {"truncated.dcm", "text.dcm"}


def test_files_without_a_suffix_are_recognised_by_their_header(tmp_path: Path) -> None:
    shutil.copy(_real("MR_small.dcm"), tmp_path / "IM0001")
    (tmp_path / "README").write_text("notes")
    assert is_dicom_file(tmp_path / "IM0001") and not is_dicom_file(tmp_path / "README")
    torch.testing.assert_close(load_image(tmp_path / "IM0001"), load_image(_real("MR_small.dcm")))


def _dicom_dataset(root: Path, layout: str) -> Path:
    """Three classes of 64×64 MR-like DICOM files (one without a suffix), in class folders or listed in a CSV."""
    template = pydicom.dcmread(_real("MR_small.dcm"))
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for split, count in {"train": 4, "val": 2, "test": 2}.items():
        for label, level in (("a", 200), ("b", 900), ("c", 1800)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                template.PixelData = (level + rng.normal(0, 150, (64, 64))).clip(0, 4000).astype(np.int16).tobytes()
                name = "IM0000" if index == 0 else f"img{index}.dcm"
                template.save_as(folder / name)
                rows.append(f"{split}/{label}/{name},{label},{split}")
    if layout == "csv":
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
        return root / "labels.csv"
    return root


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_dicom_datasets_load_in_both_layouts(tmp_path: Path, layout: str) -> None:
    dataset = load_dataset(_dicom_dataset(tmp_path / "data", layout))
    assert {split: len(samples) for split, samples in dataset.splits.items()} == {"train": 12, "val": 6, "test": 6}
    assert dataset.classes == ["a", "b", "c"]


@pytest.mark.slow
def test_train_and_predict_on_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path) -> None:
    data = _dicom_dataset(tmp_path / "data", "csv")
    run = tmp_path / "run"
    arguments = ["train", str(data), "--run", str(run), *cli_model_args(tiny_lpm_dir), "--epochs", "1"]
    assert main([*arguments, *cli_run_args(tmp_path / "cache")]) == 0
    capsys.readouterr()

    images = [str(tmp_path / "data" / "val" / "b" / "img1.dcm"), str(tmp_path / "data" / "val" / "c" / "IM0000")]
    assert main(["predict", str(run), *images, "--explain", str(tmp_path / "maps"), "--device", "cpu"]) == 0
    assert "overlays written" in capsys.readouterr().out
    assert len(list((tmp_path / "maps").glob("*_attention.png"))) >= 2

    assert main(["predict", str(run), str(_real("SC_rgb_rle_2frame.dcm")), "--device", "cpu"]) == 1
    assert "has 2 frames" in one_line_error(capsys)


def test_uncompressed_ybr_422_is_not_mistaken_for_a_truncated_file() -> None:
    """YBR_FULL_422 stores two bytes per pixel, not three: the expected length is pydicom's, not rows × cols × 3."""
    name = "SC_ybr_full_422_uncompressed.dcm"
    image = load_image(_real(name))
    assert image.shape == (3, 100, 100)
    assert unreadable_images(_real(name).parent, [name]) == {}


@pytest.mark.parametrize("name", ["badVR.dcm", "nested_priv_SQ.dcm"])
def test_malformed_headers_are_listed_as_unreadable_not_raised(name: str) -> None:
    problems = unreadable_images(_real(name).parent, [name])
    assert list(problems) == [name] and "DICOM" in problems[name]


def _with_voi_lut(tmp_path: Path, entries: int, first: int, bits: int, table: list[int]) -> Path:
    dataset = pydicom.dcmread(_real("MR_small.dcm"))
    pixels = np.zeros((64, 64), dtype=np.int16)
    pixels[0, :4] = [first - 10, first, first + 256, first + 4000]
    dataset.PixelData = pixels.tobytes()
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [entries, first, bits])  # LUT Descriptor
    item.add_new(0x00283006, "US", table)  # LUT Data
    dataset.VOILUTSequence = pydicom.Sequence([item])
    dataset.save_as(tmp_path / "lut.dcm")
    return tmp_path / "lut.dcm"


def test_a_voi_lut_maps_through_its_table_by_its_entries_bit_depth(tmp_path: Path) -> None:
    """An 8-bit table of 4096 entries (legal: the depth describes the entries, not the index range); values
    below or above the table take its first or last entry."""
    table = [min(255, index // 16) for index in range(4096)]
    image = load_image(_with_voi_lut(tmp_path, 4096, 100, 8, table))
    assert image[0, 0, :4].tolist() == pytest.approx([0.0, 0.0, 16 / 255, 250 / 255])


def test_pixel_padding_is_black_and_left_out_of_the_image_s_range(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_real("CT_small.dcm"))
    pixels = dataset.pixel_array.copy()
    pixels[:10] = -2000  # outside the scanned circle
    dataset.PixelData = pixels.tobytes()
    dataset.PixelPaddingValue = -2000
    dataset.save_as(tmp_path / "padded.dcm")
    image = load_image(tmp_path / "padded.dcm")
    assert float(image[0, :10].max()) == 0.0
    inside = image[0, 10:]
    assert float(inside.min()) == 0.0 and float(inside.max()) == 1.0  # the padding did not set the range


def test_presentation_lut_inverse_is_inverted_like_monochrome1(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_real("MR_small.dcm"))
    dataset.PresentationLUTShape = "INVERSE"
    dataset.save_as(tmp_path / "inverse.dcm")
    torch.testing.assert_close(load_image(tmp_path / "inverse.dcm"), 1 - load_image(_real("MR_small.dcm")))


def test_a_non_positive_window_width_names_the_file(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(_real("MR_small.dcm"))
    dataset.WindowWidth = 0
    dataset.save_as(tmp_path / "zero.dcm")
    with pytest.raises(FPTError, match=r"zero\.dcm: DICOM window width 0.0 is not positive"):
        load_image(tmp_path / "zero.dcm")


def test_uid_named_files_are_recognised(tmp_path: Path) -> None:
    shutil.copy(_real("MR_small.dcm"), tmp_path / "1.2.840.113619.2.55.3.7")
    (tmp_path / "notes.txt").write_text("x")
    assert is_dicom_file(tmp_path / "1.2.840.113619.2.55.3.7") and not is_dicom_file(tmp_path / "notes.txt")
