"""torch Datasets that turn samples into model inputs: views of the image, or cached LPM features."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor
from torch.utils.data import Dataset

from fpt.data.datasets import Sample
from fpt.data.images import load_image
from fpt.data.transforms import ImageTransform

if TYPE_CHECKING:
    from fpt.cache import FeatureCache


class SampleViews(Dataset):
    """Item i: a dict with ``index`` and ``label``, plus

    - ``side`` [3, s, s] when ``side_view`` is given;
    - ``lpm`` [3, S, S] when ``lpm_view`` is given (the LPM runs on the fly);
    - ``keys``/``values`` [L, H, T, d_head] when ``cache`` is given (preloaded features).

    The image is decoded only when a view needs it.
    """

    def __init__(
        self,
        root: Path,
        samples: Sequence[Sample],
        side_view: ImageTransform | None = None,
        lpm_view: ImageTransform | None = None,
        cache: FeatureCache | None = None,
    ) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.side_view = side_view
        self.lpm_view = lpm_view
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        sample = self.samples[index]
        item: dict[str, Tensor | int] = {"index": index, "label": sample.label}
        if self.side_view is not None or self.lpm_view is not None:
            image = load_image(self.root / sample.path)
            if self.side_view is not None:
                item["side"] = self.side_view(image)
            if self.lpm_view is not None:
                item["lpm"] = self.lpm_view(image)
        if self.cache is not None:
            item["keys"], item["values"] = self.cache.get(sample.path)
        return item


def worker_count(requested: int | None) -> int:
    """DataLoader workers: as requested, else one per spare core (at most 4; 0 on a single core)."""
    if requested is not None:
        return requested
    return max(0, min(4, (os.cpu_count() or 1) - 1))
