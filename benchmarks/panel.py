"""The panel of synthetic tasks that fpt's defaults are chosen on (issue 10), never the demo alone.

The tasks differ in what a user's data differs in: binary and multi-grade; balanced and imbalanced (1:3 and
worse); about 200 and about 2,000 training images; LPM input 512 px and 768 px; lesions fewer and smaller
than the demo's; PNG and JPEG; a folder tree and a CSV manifest. Seeds never overlap each other, the demo's
(0-459) or the demo LPM's pre-training (>= 1,000,000). The test splits are for the final report only:
choose settings on validation.

    python benchmarks/panel.py OUT            # write every task into OUT/<task>/ (existing ones are kept)
    python benchmarks/panel.py OUT --list     # print each task and the DATA argument to train on
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fpt.config import SynthTask


@dataclass(frozen=True)
class PanelTask:
    name: str
    task: SynthTask
    splits: dict[str, int]
    size: int  # image size, and the LPM input size to train at
    manifest: str  # "csv" (train on OUT/<name>/labels.csv) or "folders" (train on OUT/<name>/)
    first_seed: int

    def data(self, out: Path) -> Path:
        """The DATA argument of `fpt train` for this task."""
        root = out / self.name
        return root / "labels.csv" if self.manifest == "csv" else root


PANEL = (
    PanelTask(
        "binary-imbalanced-small",
        SynthTask(grades=(0, 1), class_ratio=(3, 1), lesion_count=0.5, lesion_scale=0.8, image_format="jpg"),
        {"train": 200, "val": 60, "test": 200},
        512,
        "csv",
        10_000,
    ),
    PanelTask(
        "multigrade-small",
        SynthTask(lesion_scale=0.8),
        {"train": 200, "val": 60, "test": 200},
        512,
        "folders",
        20_000,
    ),
    PanelTask(
        "binary-large",
        SynthTask(grades=(0, 1), lesion_count=0.75),
        {"train": 2000, "val": 200, "test": 400},
        512,
        "folders",
        30_000,
    ),
    PanelTask(
        "multigrade-imbalanced-768",
        SynthTask(class_ratio=(4, 2, 1, 1), lesion_count=0.75, image_format="jpg"),
        {"train": 200, "val": 64, "test": 200},
        768,
        "csv",
        40_000,
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the tasks")
    parser.add_argument("--list", action="store_true", help="only print the tasks and their DATA arguments")
    args = parser.parse_args()
    for entry in PANEL:
        if not args.list and not (args.out / entry.name / "labels.csv").is_file():
            from fpt.data.synthetic import write_dataset

            print(f"writing {entry.name}")
            write_dataset(args.out / entry.name, entry.splits, entry.first_seed, entry.size, task=entry.task)
        print(f"{entry.name}: DATA {entry.data(args.out)}, --input-size {entry.size}, {entry.task}")


if __name__ == "__main__":
    main()
