"""A synthetic high-resolution fundus benchmark with lesions too small for a 128 px view.

Every image starts from the real fundus photograph that ships with scikit-image
(``skimage.data.retina()``, 1411 px; nothing is downloaded), seen under a random rotation, zoom, shift,
illumination and colour cast, so no two backgrounds are alike. Lesions are drawn on top, inside the
fundus disc only, and the grade is decided by their counts and kinds:

    grade 0   none
    grade 1   a few microaneurysms (dark red dots)
    grade 2   more microaneurysms and a few hard exudates (small bright yellow spots)
    grade 3   many microaneurysms, small haemorrhage blots and exudates

All lesions are at most a few pixels across at 512 px, so after down-sampling to the 128 px side view
they are (nearly) invisible: only a model that reads the high-resolution image can grade them.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fpt.config import SynthTask
from fpt.errors import FPTError

GRADE_NAMES = ("0_none", "1_mild", "2_moderate", "3_severe")
MIN_SIZE = 32  # pixels


@dataclass(frozen=True)
class LesionCounts:
    """How many lesions of each kind an image of one grade gets, as inclusive (low, high) ranges."""

    microaneurysms: tuple[int, int]
    exudates: tuple[int, int] = (0, 0)
    blots: tuple[int, int] = (0, 0)


GRADES: tuple[LesionCounts, ...] = (
    LesionCounts(microaneurysms=(0, 0)),
    LesionCounts(microaneurysms=(4, 6)),
    LesionCounts(microaneurysms=(10, 14), exudates=(1, 3)),
    LesionCounts(microaneurysms=(20, 26), exudates=(3, 5), blots=(2, 4)),
)


@dataclass(frozen=True)
class Lesion:
    """One lesion in pixel coordinates of the output image."""

    kind: str  # "microaneurysm", "exudate" or "blot"
    x: float
    y: float
    radius: float


@functools.lru_cache(maxsize=2)
def fundus_source(size: int) -> Tensor:
    """scikit-image's fundus photograph resized to twice ``size``: [3, 2 size, 2 size] in [0, 1]."""
    try:
        from skimage import data
    except ImportError:
        raise FPTError("the synthetic fundus data needs scikit-image: pip install scikit-image") from None
    photograph = torch.from_numpy(data.retina()).permute(2, 0, 1).float() / 255.0
    return F.interpolate(photograph[None], size=(2 * size, 2 * size), mode="bilinear", antialias=True)[0]


def random_background(size: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A randomly rotated, zoomed, shifted, lit and coloured view [3, size, size] and its disc mask [size, size]."""
    angle = rng.uniform(0, 2 * math.pi)
    zoom = rng.uniform(1.0, 1.25)  # > 1 crops into the photograph
    shift = rng.uniform(-0.06, 0.06, size=2)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False)
    image = F.grid_sample(fundus_source(size)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        0
    ]
    mask = (image[0] > 0.12).float()
    mask = F.max_pool2d(-mask[None, None], 9, stride=1, padding=4)[0, 0].neg()  # erode the rim a little
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    direction = rng.uniform(0, 2 * math.pi)
    illumination = 1 + rng.uniform(0.0, 0.25) * (math.cos(direction) * xx + math.sin(direction) * yy)
    gain = rng.uniform(0.8, 1.15)
    colour = torch.tensor(rng.uniform(0.88, 1.12, size=3), dtype=torch.float32)[:, None, None]
    gamma = rng.uniform(0.85, 1.15)
    image = (image.clamp(0, 1) ** gamma) * gain * illumination * colour
    return image.clamp(0, 1), mask


def sample_lesions(mask: Tensor, counts: LesionCounts, rng: np.random.Generator, scale: float = 1.0) -> list[Lesion]:
    """Lesion positions drawn uniformly inside ``mask``; radii in pixels at 512 px times ``scale``."""
    inside = torch.nonzero(mask > 0.5).numpy()
    kinds = [
        ("microaneurysm", counts.microaneurysms, (2.0, 3.0)),
        ("exudate", counts.exudates, (1.5, 2.5)),
        ("blot", counts.blots, (3.0, 4.0)),
    ]
    lesions = []
    for kind, (low, high), (r_low, r_high) in kinds:
        for _ in range(int(rng.integers(low, high + 1))):
            y, x = inside[rng.integers(len(inside))]
            lesions.append(Lesion(kind, float(x), float(y), float(rng.uniform(r_low, r_high)) * scale))
    return lesions


def draw_lesions(image: Tensor, lesions: list[Lesion]) -> Tensor:
    """Blend soft-edged (anti-aliased) lesions into an image [3, H, W] in [0, 1]."""
    image = image.clone()
    height, width = image.shape[-2:]
    for lesion in lesions:
        reach = math.ceil(lesion.radius + 1)  # the disc's alpha is zero beyond radius + 0.5
        top, bottom = max(0, int(lesion.y) - reach), min(height, int(lesion.y) + reach + 1)
        left, right = max(0, int(lesion.x) - reach), min(width, int(lesion.x) + reach + 1)
        yy, xx = torch.meshgrid(
            torch.arange(top, bottom, dtype=torch.float32),
            torch.arange(left, right, dtype=torch.float32),
            indexing="ij",
        )
        distance = torch.sqrt((xx - lesion.x) ** 2 + (yy - lesion.y) ** 2)
        alpha = (lesion.radius + 0.5 - distance).clamp(0, 1)
        if lesion.kind == "exudate":  # bright yellow
            colour, strength = torch.tensor([0.98, 0.88, 0.45]), 0.85
        else:  # microaneurysms and blots: dark red
            colour, strength = image[:, int(lesion.y), int(lesion.x)] * torch.tensor([0.45, 0.18, 0.18]), 0.9
        alpha = (alpha * strength)[None]
        window = image[:, top:bottom, left:right]
        image[:, top:bottom, left:right] = window * (1 - alpha) + colour[:, None, None] * alpha
    return image.clamp(0, 1)


@dataclass
class SyntheticSample:
    image: Tensor  # [3, size, size] in [0, 1]
    background: Tensor  # the same view without lesions
    grade: int
    lesions: list[Lesion]


def scaled_counts(counts: LesionCounts, factor: float) -> LesionCounts:
    """``counts`` times ``factor`` (rounded); a kind that occurs keeps at least one lesion."""

    def scale(bounds: tuple[int, int]) -> tuple[int, int]:
        return (
            max(1, round(bounds[0] * factor)) if bounds[0] else 0,
            max(1, round(bounds[1] * factor)) if bounds[1] else 0,
        )

    return LesionCounts(scale(counts.microaneurysms), scale(counts.exudates), scale(counts.blots))


def synthesize(
    seed: int, grade: int, size: int = 512, lesion_scale: float = 1.0, lesion_count: float = 1.0
) -> SyntheticSample:
    """One synthetic fundus image of ``grade``, fully determined by its arguments; ``lesion_scale`` and
    ``lesion_count`` make the lesions smaller and fewer than the demo's (1.0)."""
    rng = np.random.default_rng(seed)
    background, mask = random_background(size, rng)
    counts = GRADES[grade] if lesion_count == 1.0 else scaled_counts(GRADES[grade], lesion_count)
    lesions = sample_lesions(mask, counts, rng, scale=lesion_scale * size / 512)
    return SyntheticSample(draw_lesions(background, lesions), background, grade, lesions)


def write_dataset(
    root: str | Path,
    counts: dict[str, int],
    first_seed: int = 0,
    size: int = 512,
    progress: bool = True,
    task: SynthTask | None = None,
) -> Path:
    """Write ``ROOT/{split}/{grade}/{seed}.{png,jpg}`` plus ``ROOT/labels.csv`` (path,label,split).

    ``counts`` maps split names to image counts; seeds run consecutively from ``first_seed`` across the
    splits (so every split uses its own seeds) and take the ``task``'s grades in turn, each as often as its
    class ratio says (the demo's task: all four grades, equally often).
    """
    from fpt.runtime import progress_bar

    if size < MIN_SIZE:
        raise FPTError(
            f"synthetic images need at least {MIN_SIZE} px (lesions and vessels do not fit below), got {size}"
        )
    if min(counts.values(), default=0) < 0 or sum(counts.values()) < 1:
        raise FPTError(f"image counts must not be negative and must add up to at least one, got {counts}")
    task = task or SynthTask()
    cycle = task.label_cycle()
    root = Path(root)
    rows, jobs = [], []
    start = first_seed
    for split, count in counts.items():
        for seed in range(start, start + count):
            grade = cycle[seed % len(cycle)]
            path = Path(split) / GRADE_NAMES[grade] / f"{seed:06d}.{task.image_format}"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            rows.append([path.as_posix(), GRADE_NAMES[grade], split])
            jobs.append((seed, grade, size, task, root / path))
        start += count
    workers = min(len(jobs), os.cpu_count() or 1)
    bar = progress_bar(total=len(jobs), enabled=progress, desc="synthesise", unit="img")
    # each image depends on its seed alone, so drawing them on every core gives the same files
    with bar, ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        for _ in pool.map(_write_one, jobs, chunksize=8):
            bar.update(1)
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "split"], *rows])
    return root


def _one_thread() -> None:
    torch.set_num_threads(1)  # one process per core


def _write_one(job: tuple[int, int, int, SynthTask, Path]) -> None:
    seed, grade, size, task, path = job
    save_image(synthesize(seed, grade, size, task.lesion_scale, task.lesion_count).image, path)


def save_image(image: Tensor, path: Path) -> None:
    """Write an RGB image [3, H, W] in [0, 1] as PNG, or as JPEG (quality 95) for a .jpg path."""
    pixels = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pixels.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
