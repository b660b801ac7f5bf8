"""The two views of an image (LPM: resize + normalise only; side: augmented at training), the normalisation
statistics, and `SampleViews`, which turns samples into model inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fpt.config import Augmentation
from fpt.data.datasets import Sample
from fpt.data.images import load_image
from fpt.data.loaders import SampleViews, dataset_normalization, worker_count
from fpt.data.transforms import Normalization, lpm_view, side_view

NORM = Normalization((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
IDENTITY = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def random_image(height: int, width: int, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(3, height, width, generator=generator)


def explicit_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def explicit_normalize(image: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    mean = torch.tensor(normalization.mean).view(3, 1, 1)
    std = torch.tensor(normalization.std).view(3, 1, 1)
    return (image - mean) / std


# --- LPM view ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "size"), [(37, 53, 16), (20, 30, 48), (32, 32, 32)])
def test_lpm_view_is_bilinear_antialiased_resize_then_normalisation(height: int, width: int, size: int) -> None:
    image = random_image(height, width)
    out = lpm_view(size, NORM)(image)
    assert out.shape == (3, size, size)
    expected = explicit_normalize(explicit_resize(image, size), NORM)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_lpm_view_is_deterministic_whatever_the_seed() -> None:
    image = random_image(40, 56)
    view = lpm_view(24, NORM)
    outputs = []
    for seed in (0, 1, 2, 3):
        torch.manual_seed(seed)
        outputs.append(view(image))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_lpm_view_does_not_modify_its_input() -> None:
    image = random_image(20, 20)
    copy = image.clone()
    lpm_view(8, NORM)(image)
    assert torch.equal(image, copy)


# --- side view ---------------------------------------------------------------------------------------------------


def test_augmentation_defaults_match_the_specification() -> None:
    augmentation = Augmentation()
    assert augmentation.crop_scale == (0.8, 1.0)
    assert augmentation.crop_ratio == (0.7, 1.3)
    assert augmentation.hflip == 0.5
    assert augmentation.brightness == 0.2
    assert augmentation.contrast == 0.2


def test_augmentation_turns_lists_into_tuples() -> None:  # e.g. when read back from a JSON config
    augmentation = Augmentation(crop_scale=[0.5, 1.0], crop_ratio=[0.9, 1.1])
    assert augmentation.crop_scale == (0.5, 1.0)
    assert augmentation.crop_ratio == (0.9, 1.1)


def test_side_view_at_evaluation_is_a_deterministic_resize() -> None:
    image = random_image(30, 45)
    view = side_view(16, NORM, augmentation=None)
    torch.manual_seed(0)
    first = view(image)
    torch.manual_seed(1)
    second = view(image)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, explicit_normalize(explicit_resize(image, 16), NORM), rtol=1e-5, atol=1e-5)


def test_side_view_at_training_has_the_output_size_and_varies_with_the_seed() -> None:
    image = random_image(40, 60)
    view = side_view(24, NORM, Augmentation())
    outputs = {}
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        outputs[seed] = view(image)
        assert outputs[seed].shape == (3, 24, 24)
    torch.manual_seed(0)
    assert torch.equal(view(image), outputs[0]), "same seed, same augmentation"
    assert not torch.allclose(outputs[0], outputs[1])
    assert not torch.allclose(outputs[1], outputs[2])
    assert not torch.allclose(outputs[0], explicit_normalize(explicit_resize(image, 24), NORM))


def test_side_view_crops_the_original_image_with_the_given_scale_and_ratio() -> None:
    view = side_view(16, NORM, Augmentation())
    crop = view.transforms[0]  # the crop comes first: from the original image, not from a resized copy
    assert type(crop).__name__ == "RandomResizedCrop"
    assert tuple(crop.scale) == (0.8, 1.0)
    assert tuple(crop.ratio) == (0.7, 1.3)


def test_side_view_without_crop_flip_or_jitter_equals_the_resize() -> None:
    # a full-image crop (scale 1, ratio 1 on a square image), no flip and no jitter leave only the resize
    image = random_image(32, 32)
    still = Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, brightness=0.0, contrast=0.0)
    torch.manual_seed(0)
    out = side_view(16, NORM, still)(image)
    torch.testing.assert_close(out, explicit_normalize(explicit_resize(image, 16), NORM), rtol=1e-5, atol=1e-5)


def test_8_bit_pixels_give_the_lpm_view_of_their_float_image_exactly_and_the_side_view_within_rounding() -> None:
    pixels = (random_image(64, 80) * 255).round().to(torch.uint8)
    image = pixels.float() / 255.0
    assert torch.equal(lpm_view(32, NORM)(pixels), lpm_view(32, NORM)(image))  # the cache does not change
    # within one 8-bit level (the resized pixels are rounded), widened by at most 1.4 by the jitter
    for augmentation, tolerance in ((None, 1 / 255), (Augmentation(), 1.4 / 255)):
        views = []
        for source in (pixels, image):
            torch.manual_seed(0)  # the same crop, flip and jitter for both
            views.append(side_view(16, IDENTITY, augmentation)(source))
        assert views[0].shape == (3, 16, 16)
        torch.testing.assert_close(views[0], views[1], rtol=0, atol=tolerance)


def test_side_view_flip_mirrors_the_image() -> None:
    image = random_image(32, 32)
    always_flip = Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, brightness=0.0, contrast=0.0)
    torch.manual_seed(0)
    out = side_view(16, IDENTITY, always_flip)(image)
    torch.testing.assert_close(out, explicit_resize(image, 16).flip(-1), rtol=1e-5, atol=1e-5)


def test_brightness_jitter_scales_the_image_by_at_most_20_percent() -> None:
    # values in [0.2, 0.6] so that a factor up to 1.2 is never clipped at 1
    image = random_image(32, 32, low=0.2, high=0.6)
    only_brightness = Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, contrast=0.0)
    view = side_view(16, IDENTITY, only_brightness)
    resized = explicit_resize(image, 16)
    factors = []
    for seed in range(20):
        torch.manual_seed(seed)
        ratio = view(image) / resized
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.mean().item()), rtol=1e-4, atol=1e-4)
        factors.append(ratio.mean().item())
    assert all(0.8 - 1e-4 <= factor <= 1.2 + 1e-4 for factor in factors)
    assert max(factors) - min(factors) > 0.05, "brightness does not vary"


def test_contrast_jitter_scales_the_spread_by_at_most_20_percent() -> None:
    gray = random_image(32, 32, low=0.3, high=0.7)[:1].expand(3, -1, -1)  # equal channels: grayscale = image
    only_contrast = Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, brightness=0.0)
    view = side_view(16, IDENTITY, only_contrast)
    spread = explicit_resize(gray, 16).std().item()
    factors = []
    for seed in range(20):
        torch.manual_seed(seed)
        factors.append(view(gray).std().item() / spread)
    assert all(0.8 - 1e-3 <= factor <= 1.2 + 1e-3 for factor in factors)
    assert max(factors) - min(factors) > 0.05, "contrast does not vary"


# --- normalisation statistics ------------------------------------------------------------------------------------


def write_rgb(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_dataset_normalization_of_images_at_their_own_size_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    arrays[1][..., 2] //= 4  # make the channels differ
    paths = [write_rgb(tmp_path / f"{i}.png", array) for i, array in enumerate(arrays)]
    pixels = np.stack(arrays).astype(np.float64) / 255.0  # [N, H, W, 3]
    stats = dataset_normalization(paths, size=8)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 1, 2)), rtol=1e-5)


def test_dataset_normalization_uses_the_resized_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    shapes = [(10, 12), (16, 16), (7, 9), (20, 11)]
    arrays = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    paths = [write_rgb(tmp_path / f"{i}.png", array) for i, array in enumerate(arrays)]
    resized = [
        explicit_resize(torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1), 8).numpy()
        for array in arrays
    ]
    pixels = np.stack(resized).astype(np.float64)  # [N, 3, 8, 8]
    stats = dataset_normalization(paths, size=8)
    assert isinstance(stats, Normalization)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 2, 3)), rtol=1e-4)


def test_dataset_normalization_of_a_flat_image_has_a_positive_std(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "flat.png", np.full((4, 4, 3), 51, dtype=np.uint8))
    stats = dataset_normalization([path], size=4)
    np.testing.assert_allclose(stats.mean, [0.2, 0.2, 0.2], rtol=1e-6)
    assert all(0 < value < 1e-3 for value in stats.std)  # clamped, so normalising never divides by zero


# --- SampleViews -------------------------------------------------------------------------------------------------


class FakeCache:
    """Stands in for FeatureCache: ``get(path)`` returns keys and values and records the paths asked for."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def get(self, key: str) -> dict[str, torch.Tensor]:
        self.requested.append(key)
        code = float(len(key))
        return {"keys": torch.full((2, 1, 3, 4), code), "values": torch.full((2, 1, 3, 4), -code)}


@pytest.fixture
def two_images(tmp_path: Path) -> list[Sample]:
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    write_rgb(tmp_path / "a" / "one.png", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    write_rgb(tmp_path / "a" / "two.png", rng.integers(0, 256, (18, 10, 3), dtype=np.uint8))
    return [Sample("a/one.png", 0), Sample("a/two.png", 2)]


def test_sample_views_returns_index_label_and_the_requested_views(tmp_path: Path, two_images: list[Sample]) -> None:
    dataset = SampleViews(tmp_path, two_images, side_view=side_view(8, NORM, None), lpm_view=lpm_view(16, NORM))
    assert len(dataset) == 2
    item = dataset[1]
    assert set(item) == {"index", "label", "side", "lpm"}
    assert (item["index"], item["label"]) == (1, 2)
    assert item["side"].shape == (3, 8, 8)
    assert item["lpm"].shape == (3, 16, 16)
    image = load_image(tmp_path / "a" / "two.png")
    torch.testing.assert_close(item["lpm"], explicit_normalize(explicit_resize(image, 16), NORM), rtol=1e-5, atol=1e-5)


def test_sample_views_with_only_a_side_view(tmp_path: Path, two_images: list[Sample]) -> None:
    item = SampleViews(tmp_path, two_images, side_view=side_view(8, NORM, None))[0]
    assert set(item) == {"index", "label", "side"}


def test_sample_views_with_a_cache_returns_its_keys_and_values(tmp_path: Path, two_images: list[Sample]) -> None:
    cache = FakeCache()
    dataset = SampleViews(tmp_path, two_images, side_view=side_view(8, NORM, None), cache=cache)
    item = dataset[0]
    assert set(item) == {"index", "label", "side", "keys", "values"}
    assert cache.requested == ["a/one.png"]  # the sample's relative path is the cache key
    assert torch.equal(item["keys"], torch.full((2, 1, 3, 4), 9.0))
    assert torch.equal(item["values"], torch.full((2, 1, 3, 4), -9.0))


def test_sample_views_does_not_decode_the_image_when_no_view_needs_it(tmp_path: Path) -> None:
    cache = FakeCache()
    item = SampleViews(tmp_path, [Sample("not/on/disk.png", 1)], cache=cache)[0]  # would fail if it were opened
    assert set(item) == {"index", "label", "keys", "values"}
    assert cache.requested == ["not/on/disk.png"]


def test_worker_count() -> None:
    assert worker_count(3) == 3
    assert worker_count(0) == 0
    assert 0 <= worker_count(None) <= 4
    # never more workers than batches less one: a lone batch is loaded in the process itself
    assert [worker_count(3, batches) for batches in (1, 2, 3, 4, 9)] == [0, 1, 2, 3, 3]
    assert worker_count(None, 1) == 0
