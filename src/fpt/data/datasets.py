"""Finding a labelled image dataset on disk: a split folder layout or a CSV manifest.

Folder layout: ``ROOT/{train,val,test}/<class>/<image>`` (``ROOT/<class>/<image>`` is split
automatically). CSV manifest: columns ``path,label[,split]``, paths relative to the CSV's folder.
Missing val/test splits are made by a seeded stratified split of the training images.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fpt.data.images import SUPPORTED_FORMATS, is_image_file
from fpt.errors import FPTError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image: its POSIX path relative to the data root (the cache key) and its class index."""

    path: str
    label: int


@dataclass
class ImageDataset:
    """The images of every split, their class list, and how the splits were made."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]
    ignored_files: list[str] = field(default_factory=list)
    generated_split: dict[str, Any] | None = None

    def class_counts(self, split: str) -> list[int]:
        counts = Counter(sample.label for sample in self.splits[split])
        return [counts[index] for index in range(len(self.classes))]

    def to_record(self) -> dict[str, Any]:
        """Everything needed to reproduce the splits exactly (written into a run directory)."""
        return {
            "root": str(self.root),
            "classes": self.classes,
            "generated_split": self.generated_split,
            "splits": {name: [[s.path, s.label] for s in samples] for name, samples in self.splits.items()},
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ImageDataset:
        return cls(
            root=Path(record["root"]),
            classes=list(record["classes"]),
            splits={name: [Sample(path, label) for path, label in rows] for name, rows in record["splits"].items()},
            generated_split=record["generated_split"],
        )

    def ignored_summary(self) -> str | None:
        """One line about skipped non-image files, or None."""
        if not self.ignored_files:
            return None
        names = sorted({Path(path).name for path in self.ignored_files})
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"ignored {len(self.ignored_files)} non-image files ({shown})"


def load_dataset(
    source: str | Path,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    images_outside_root: bool = False,
) -> ImageDataset:
    """Read the dataset at ``source``: a folder (split layout or class folders) or a ``.csv`` manifest (whose
    images must lie in its own folder unless ``images_outside_root``)."""
    source = Path(source).expanduser().resolve()
    if source.is_file() and source.suffix.lower() == ".csv":
        root, classes, splits, ignored = source.parent, *_read_csv(source, images_outside_root), []
    elif source.is_dir():
        root = source
        classes, splits, ignored = _read_folders(source)
    else:
        raise FPTError(f"data source {source} is neither a folder nor a .csv manifest")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise FPTError(
            f"val and test fractions ({val_fraction}, {test_fraction}) must each be in (0, 1) and leave images "
            "for training"
        )
    if len(classes) < 2:
        raise FPTError(
            f"{source} has one class ({', '.join(classes)}); a classifier needs images of at least two classes"
        )
    generated = None
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        splits, generated = _stratified_split(splits, classes, missing, val_fraction, test_fraction, seed)
    _check_splits(splits, classes)
    return ImageDataset(root, classes, splits, ignored, generated)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders class '2' before '10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _read_folders(root: Path) -> tuple[list[str], dict[str, list[Sample]], list[str]]:
    split_dirs = {name: root / name for name in SPLITS if (root / name).is_dir()}
    if not split_dirs:  # ROOT/<class>/<image>: everything is training data, split later
        split_dirs = {"train": root}
    elif "train" not in split_dirs:
        raise FPTError(f"{root} has {', '.join(split_dirs)} but no train/ folder")
    class_names = {
        name: sorted(
            (p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key
        )
        for name, directory in split_dirs.items()
    }
    for name, names in class_names.items():
        if not names:
            raise FPTError(
                f"split folder {split_dirs[name]} has no class folders; expected {split_dirs[name]}/<class>/<image> "
                "(or remove the empty folder)"
            )
    classes = class_names["train"]
    for name, names in class_names.items():
        if names != classes:
            _raise_class_mismatch(str(split_dirs[name]), name, set(names), set(classes))
    splits: dict[str, list[Sample]] = {}
    ignored: list[str] = []
    for name, directory in split_dirs.items():
        splits[name] = []
        for label, class_name in enumerate(classes):
            class_dir = directory / class_name
            files = sorted(
                p for p in class_dir.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(class_dir).parent)
            )
            readable = [is_image_file(p) for p in files]  # once per file: a suffix-less one is opened to check
            images = [p for p, image in zip(files, readable, strict=True) if image]
            ignored += [p.relative_to(root).as_posix() for p, image in zip(files, readable, strict=True) if not image]
            if not images:
                raise FPTError(f"class folder {class_dir} has no images ({SUPPORTED_FORMATS}); add some or remove it")
            splits[name] += [Sample(p.relative_to(root).as_posix(), label) for p in images]
    return classes, splits, ignored


def _read_csv(path: Path, images_outside_root: bool) -> tuple[list[str], dict[str, list[Sample]]]:
    root = path.parent
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"path", "label"} <= columns:
            raise FPTError(f"{path} needs a header with columns path,label[,split]; found {sorted(columns)}")
        rows = list(reader)
    if not rows:
        raise FPTError(f"{path} lists no images")
    by_split: dict[str, list[tuple[str, str]]] = {}
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        split = (row.get("split") or "train").strip() if "split" in columns else "train"
        if split not in SPLITS:
            raise FPTError(f"{path}:{line}: split '{split}' is not one of {', '.join(SPLITS)}")
        listed = row["path"].strip()
        location = Path(os.path.normpath(root / listed))  # lexically: data/../data/x.png is data/x.png
        if not location.is_relative_to(root) and not images_outside_root:
            raise FPTError(
                f"{path}:{line}: {listed} lies outside the CSV's folder {root}; put the CSV in a folder that holds "
                "all the images, or pass --images-outside-root"
            )
        image = Path(os.path.relpath(location, root))  # canonical, with leading ../ for an image outside
        if not location.is_file():
            raise FPTError(f"{path}:{line}: image {location} does not exist")
        if not is_image_file(location):
            raise FPTError(f"{path}:{line}: {image} is not a supported image ({SUPPORTED_FORMATS})")
        real = os.path.realpath(location)  # the same file under two names (a link) counts once too
        if real in first_line:
            raise FPTError(
                f"{path}:{line}: {listed} is already listed on line {first_line[real]} (the same file); each image may "
                "appear once (an image in two splits would leak into evaluation)"
            )
        first_line[real] = line
        by_split.setdefault(split, []).append((image.as_posix(), row["label"].strip()))
    if "train" not in by_split:
        raise FPTError(f"{path} has no training rows (split 'train' or an empty split column)")
    classes = sorted({label for _, label in by_split["train"]}, key=natural_key)
    for name, rows_of_split in by_split.items():
        labels = {label for _, label in rows_of_split}
        if labels != set(classes):
            _raise_class_mismatch(str(path), name, labels, set(classes))
    index = {name: label for label, name in enumerate(classes)}
    splits = {name: [Sample(image, index[label]) for image, label in items] for name, items in by_split.items()}
    return classes, splits


def _raise_class_mismatch(source: str, split: str, found: set[str], expected: set[str]) -> None:
    parts = []
    if found - expected:
        parts.append(f"not in train: {', '.join(sorted(found - expected, key=natural_key))}")
    if expected - found:
        parts.append(f"missing: {', '.join(sorted(expected - found, key=natural_key))}")
    raise FPTError(
        f"{source}: split '{split}' has a different class set than train ({'; '.join(parts)}); every split needs "
        "the same classes"
    )


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _stratified_split(
    splits: dict[str, list[Sample]],
    classes: list[str],
    missing: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Move a seeded, per-class share of the training images into each missing split."""
    fractions = {"val": val_fraction, "test": test_fraction}
    rng = np.random.default_rng(seed)
    result = {name: list(samples) for name, samples in splits.items()}
    result["train"] = []
    for name in missing:
        result[name] = []
    for label, class_name in enumerate(classes):
        members = [s for s in splits["train"] if s.label == label]
        members = [members[i] for i in rng.permutation(len(members))]
        if len(members) < len(missing) + 1:
            raise FPTError(
                f"class '{class_name}' has {len(members)} training images, too few to also make "
                f"{' and '.join(missing)} splits; add images or provide the splits"
            )
        class_size = len(members)
        for name in missing:
            count = min(max(1, round(class_size * fractions[name])), len(members) - 1)
            result[name] += members[:count]
            members = members[count:]
        result["train"] += members
    record = {"seed": seed, "made": missing, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return {name: sorted(result[name], key=lambda s: s.path) for name in SPLITS}, record


def _check_splits(splits: dict[str, list[Sample]], classes: list[str]) -> None:
    for name in SPLITS:
        if not splits.get(name):
            raise FPTError(f"split '{name}' has no images")
    for name, samples in splits.items():
        seen = {s.label for s in samples}
        if len(seen) != len(classes):
            absent = [classes[i] for i in range(len(classes)) if i not in seen]
            raise FPTError(f"split '{name}' has no images of class {', '.join(absent)}")
