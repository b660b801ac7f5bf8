"""`load_dataset`: split folders, class folders and CSV manifests; seeded stratified splits; clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fpt.data.datasets import ImageDataset, Sample, load_dataset, natural_key
from fpt.errors import FPTError


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes()  # one tiny real PNG, copied into every image file


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG)
    return path


def make_classes(directory: Path, counts: dict[str, int]) -> list[str]:
    """``directory/<class>/<class>_<i>.png`` for each class; returns the paths relative to ``directory``."""
    written = []
    for class_name, count in counts.items():
        for i in range(count):
            write_image(directory / class_name / f"{class_name}_{i:03d}.png")
            written.append(f"{class_name}/{class_name}_{i:03d}.png")
    return written


def make_split_layout(root: Path, counts: dict[str, dict[str, int]]) -> None:
    """``root/<split>/<class>/<image>`` with ``counts[split][class]`` images."""
    for split, class_counts in counts.items():
        make_classes(root / split, class_counts)


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def all_paths(dataset: ImageDataset) -> list[str]:
    return [sample.path for samples in dataset.splits.values() for sample in samples]


def path_sets(dataset: ImageDataset) -> dict[str, set[str]]:
    return {name: {sample.path for sample in samples} for name, samples in dataset.splits.items()}


# --- folder layout ---------------------------------------------------------------------------------------------


def test_split_folder_layout_reads_every_split(tmp_path: Path) -> None:
    make_split_layout(
        tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 2, "dog": 1}}
    )
    dataset = load_dataset(tmp_path)
    assert dataset.root == tmp_path.resolve()
    assert dataset.classes == ["cat", "dog"]
    assert dataset.generated_split is None
    assert dataset.splits["val"] == [Sample("val/cat/cat_000.png", 0), Sample("val/dog/dog_000.png", 1)]
    assert dataset.class_counts("train") == [3, 2]
    assert dataset.class_counts("test") == [2, 1]
    assert dataset.ignored_summary() is None


def test_sample_paths_are_posix_and_relative_to_the_root(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {split: {"a": 1, "b": 1} for split in ("train", "val", "test")})
    write_image(tmp_path / "train" / "a" / "nested" / "deep.png")  # images in subfolders of a class count too
    dataset = load_dataset(tmp_path)
    assert Sample("train/a/nested/deep.png", 0) in dataset.splits["train"]
    for path in all_paths(dataset):
        assert not Path(path).is_absolute()
        assert "\\" not in path
        assert (tmp_path / path).is_file()


def test_classes_are_in_natural_order(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {split: {"10": 1, "2": 1, "1": 1} for split in ("train", "val", "test")})
    dataset = load_dataset(tmp_path)
    assert dataset.classes == ["1", "2", "10"]
    # labels index that order: the images of folder '10' have label 2
    assert {sample.label for sample in dataset.splits["train"] if sample.path.startswith("train/10/")} == {2}


def test_natural_key_orders_numbers_by_value() -> None:
    assert sorted(["10", "2", "1"], key=natural_key) == ["1", "2", "10"]
    assert sorted(["grade10", "grade2", "Grade1"], key=natural_key) == ["Grade1", "grade2", "grade10"]


def test_class_folders_without_split_folders_are_split_automatically(tmp_path: Path) -> None:
    written = make_classes(tmp_path, {"a": 20, "b": 20})
    dataset = load_dataset(tmp_path, seed=3)
    assert dataset.classes == ["a", "b"]
    assert sorted(dataset.splits) == ["test", "train", "val"]
    assert sorted(all_paths(dataset)) == sorted(written)
    assert dataset.generated_split == {"seed": 3, "made": ["val", "test"], "val_fraction": 0.15, "test_fraction": 0.15}


def test_generated_split_is_stratified_disjoint_and_covers_every_image(tmp_path: Path) -> None:
    written = make_classes(tmp_path, {"a": 20, "b": 12, "c": 7})
    dataset = load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    paths = all_paths(dataset)
    assert len(paths) == len(set(paths)), "a sample is in two splits"
    assert sorted(paths) == sorted(written)
    for name in ("train", "val", "test"):
        assert all(count >= 1 for count in dataset.class_counts(name)), f"a class is missing from {name}"
    # each sample keeps the label of its class folder
    for samples in dataset.splits.values():
        for sample in samples:
            assert dataset.classes[sample.label] == sample.path.split("/")[0]


def test_generated_split_takes_the_val_fraction_of_each_class(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 20, "b": 40})
    dataset = load_dataset(tmp_path, val_fraction=0.25, test_fraction=0.1, seed=0)
    assert dataset.class_counts("val") == [5, 10]


def test_generated_split_proportions_match_both_fractions(tmp_path: Path) -> None:
    counts = {"a": 60, "b": 100}
    make_classes(tmp_path, counts)
    dataset = load_dataset(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    for name, fraction in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
        for total, count in zip(counts.values(), dataset.class_counts(name), strict=True):
            assert abs(count - fraction * total) <= 1, f"{name}: {count} of {total} images, expected ~{fraction}"


def test_same_seed_gives_the_same_split(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 20, "b": 20})
    assert path_sets(load_dataset(tmp_path, seed=7)) == path_sets(load_dataset(tmp_path, seed=7))


def test_different_seeds_give_different_splits(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 20, "b": 20})
    first, second = path_sets(load_dataset(tmp_path, seed=0)), path_sets(load_dataset(tmp_path, seed=1))
    assert first["val"] != second["val"]
    assert first["test"] != second["test"]


def test_only_the_missing_split_is_made(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {"train": {"a": 10, "b": 10}, "val": {"a": 2, "b": 3}})
    dataset = load_dataset(tmp_path, test_fraction=0.2, seed=0)
    assert path_sets(dataset)["val"] == {f"val/a/a_{i:03d}.png" for i in range(2)} | {
        f"val/b/b_{i:03d}.png" for i in range(3)
    }
    assert dataset.generated_split["made"] == ["test"]
    assert all(path.startswith("train/") for path in path_sets(dataset)["test"])
    assert dataset.class_counts("test") == [2, 2]
    assert dataset.class_counts("train") == [8, 8]


def test_record_round_trips_through_json(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 8, "b": 9})
    dataset = load_dataset(tmp_path, seed=5)
    restored = ImageDataset.from_record(json.loads(json.dumps(dataset.to_record())))
    assert restored == dataset
    assert restored.generated_split == {"seed": 5, "made": ["val", "test"], "val_fraction": 0.15, "test_fraction": 0.15}
    assert restored.splits == dataset.splits


def test_non_image_files_are_ignored_with_one_summary_line(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {split: {"a": 2, "b": 2} for split in ("train", "val", "test")})
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "val" / "a" / "notes.txt").write_text("scanner settings")
    (tmp_path / "test" / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    dataset = load_dataset(tmp_path)
    assert len(all_paths(dataset)) == 12
    assert all(path.endswith(".png") for path in all_paths(dataset))
    summary = dataset.ignored_summary()
    assert summary is not None
    assert "\n" not in summary
    assert summary == "ignored 4 non-image files (.DS_Store, Thumbs.db, notes.txt)"


# --- folder layout errors ----------------------------------------------------------------------------------------


def test_class_mismatch_lists_missing_and_extra_classes(tmp_path: Path) -> None:
    make_split_layout(
        tmp_path,
        {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 1, "c": 1, "z": 1}, "test": {"a": 1, "b": 1, "c": 1}},
    )
    with pytest.raises(FPTError, match="val") as error:
        load_dataset(tmp_path)
    message = str(error.value)
    assert "missing: b" in message
    assert "not in train: z" in message


def test_empty_class_folder_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {split: {"a": 2, "b": 2} for split in ("train", "val", "test")})
    empty = tmp_path / "train" / "c"
    empty.mkdir()
    for split in ("val", "test"):
        write_image(tmp_path / split / "c" / "c.png")
    with pytest.raises(FPTError, match="no images") as error:
        load_dataset(tmp_path)
    assert str(empty.resolve()) in str(error.value)
    assert "add some or remove it" in str(error.value)


def test_class_folder_with_only_non_images_is_an_error(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 4})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(FPTError, match="no images") as error:
        load_dataset(tmp_path)
    assert str((tmp_path / "b").resolve()) in str(error.value)


def test_split_folder_with_no_images_error_names_the_folder(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    (tmp_path / "val").mkdir()
    with pytest.raises(FPTError, match="has no class folders") as error:
        load_dataset(tmp_path)
    assert str((tmp_path / "val").resolve()) in str(error.value)


def test_split_folders_without_train_is_an_error(tmp_path: Path) -> None:
    make_split_layout(tmp_path, {"val": {"a": 1}, "test": {"a": 1}})
    with pytest.raises(FPTError, match="no train/ folder"):
        load_dataset(tmp_path)


def test_folder_without_class_folders_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png")
    with pytest.raises(FPTError, match="no class folders") as error:
        load_dataset(tmp_path)
    assert "<class>/<image>" in str(error.value)


def test_class_with_too_few_images_to_split_is_an_error(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 10, "rare": 2})  # val and test need one image each, train one more
    with pytest.raises(FPTError, match="'rare' has 2 training images, too few") as error:
        load_dataset(tmp_path)
    assert "add images or provide the splits" in str(error.value)


def test_three_images_are_enough_for_a_split(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 10, "rare": 3})
    dataset = load_dataset(tmp_path)
    assert [dataset.class_counts(name)[1] for name in ("train", "val", "test")] == [1, 1, 1]


def test_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match=r"neither a folder nor a \.csv") as error:
        load_dataset(tmp_path / "absent")
    assert "absent" in str(error.value)


# --- CSV manifest --------------------------------------------------------------------------------------------------


def test_csv_with_split_column_paths_relative_to_the_csv(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("x1", "x2", "y1", "y2", "v1", "v2", "t1", "t2"):
        write_image(data / "images" / f"{name}.png")
    rows = ["path,label,split", "images/x1.png,10,train", "images/x2.png,10,train", "images/y1.png,2,train"]
    rows += ["images/y2.png,2,train", "images/v1.png,10,val", "images/v2.png,2,val"]
    rows += ["images/t1.png,2,test", "images/t2.png,10,test"]
    manifest = write_csv(data / "labels.csv", "\n".join(rows) + "\n")
    dataset = load_dataset(manifest)
    assert dataset.root == data.resolve()
    assert dataset.classes == ["2", "10"]
    assert dataset.generated_split is None
    assert dataset.splits["val"] == [Sample("images/v1.png", 1), Sample("images/v2.png", 0)]
    assert dataset.splits["test"] == [Sample("images/t1.png", 0), Sample("images/t2.png", 1)]
    assert dataset.class_counts("train") == [2, 2]


def test_csv_without_split_column_is_split_automatically(tmp_path: Path) -> None:
    lines = ["path,label"]
    for class_name in ("a", "b"):
        for i in range(10):
            write_image(tmp_path / f"{class_name}{i}.png")
            lines.append(f"{class_name}{i}.png,{class_name}")
    dataset = load_dataset(write_csv(tmp_path / "all.csv", "\n".join(lines)), seed=2)
    assert dataset.generated_split["made"] == ["val", "test"]
    assert sorted(all_paths(dataset)) == sorted(line.split(",")[0] for line in lines[1:])
    for name in ("train", "val", "test"):
        assert all(count >= 1 for count in dataset.class_counts(name))


def test_csv_with_only_train_and_val_gets_a_test_split(tmp_path: Path) -> None:
    lines = ["path,label,split"]
    for class_name in ("a", "b"):
        for i in range(6):
            write_image(tmp_path / f"{class_name}{i}.png")
            lines.append(f"{class_name}{i}.png,{class_name},{'val' if i == 0 else 'train'}")
    dataset = load_dataset(write_csv(tmp_path / "m.csv", "\n".join(lines)))
    assert dataset.generated_split["made"] == ["test"]
    assert path_sets(dataset)["val"] == {"a0.png", "b0.png"}


def _csv_with_val_labels(tmp_path: Path, val_labels: list[str]) -> Path:
    lines = ["path,label,split"]
    for class_name in ("a", "b"):
        for split in ("train", "test"):
            write_image(tmp_path / f"{split}_{class_name}.png")
            lines.append(f"{split}_{class_name}.png,{class_name},{split}")
    for i, label in enumerate(val_labels):
        write_image(tmp_path / f"val{i}.png")
        lines.append(f"val{i}.png,{label},val")
    return write_csv(tmp_path / "m.csv", "\n".join(lines))


def test_csv_unknown_class_in_val_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match="'val'") as error:
        load_dataset(_csv_with_val_labels(tmp_path, ["a", "b", "zebra"]))
    assert "not in train: zebra" in str(error.value)


def test_csv_class_missing_from_val_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match="missing: b"):
        load_dataset(_csv_with_val_labels(tmp_path, ["a"]))


def test_csv_unknown_class_error_names_the_csv(tmp_path: Path) -> None:
    manifest = _csv_with_val_labels(tmp_path, ["a", "b", "zebra"])
    with pytest.raises(FPTError) as error:
        load_dataset(manifest)
    assert str(manifest.resolve()) in str(error.value)


def test_csv_path_that_does_not_exist_is_an_error_naming_line_and_path(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "m.csv", "path,label\na.png,a\nmissing/b.png,b\n")
    with pytest.raises(FPTError, match="does not exist") as error:
        load_dataset(manifest)
    assert f"{manifest.resolve()}:3" in str(error.value)
    assert str(tmp_path.resolve() / "missing" / "b.png") in str(error.value)


def test_csv_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match=r"absent\.csv"):
        load_dataset(tmp_path / "absent.csv")


@pytest.mark.parametrize("text", ["a.png,a\nb.png,b\n", "file,class\na.png,a\n", "path,split\na.png,train\n", ""])
def test_csv_without_path_label_header_is_an_error(tmp_path: Path, text: str) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    manifest = write_csv(tmp_path / "m.csv", text)
    with pytest.raises(FPTError, match="path,label") as error:
        load_dataset(manifest)
    assert str(manifest.resolve()) in str(error.value)


def test_csv_with_header_only_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match="lists no images"):
        load_dataset(write_csv(tmp_path / "m.csv", "path,label\n"))


def test_csv_unknown_split_name_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "m.csv", "path,label,split\na.png,a,validation\n")
    with pytest.raises(FPTError, match="split 'validation' is not one of train, val, test") as error:
        load_dataset(manifest)
    assert f"{manifest.resolve()}:2" in str(error.value)


def test_csv_row_that_is_not_an_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FPTError, match=r"notes\.txt is not a supported image"):
        load_dataset(write_csv(tmp_path / "m.csv", "path,label\nnotes.txt,a\n"))


def test_csv_without_training_rows_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    with pytest.raises(FPTError, match="no training rows"):
        load_dataset(write_csv(tmp_path / "m.csv", "path,label,split\na.png,a,val\n"))


def test_csv_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    lines = ["path,label,split"]
    for split in ("train", "val", "test"):
        for class_name in ("a", "b"):
            write_image(tmp_path / f"{split}_{class_name}.png")
            lines.append(f"{split}_{class_name}.png,{class_name},{split}")
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    assert load_dataset(manifest).classes == ["a", "b"]


def test_hidden_folders_are_neither_classes_nor_images(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 5, "b": 5})
    write_image(tmp_path / ".ipynb_checkpoints" / "x.png")
    write_image(tmp_path / "a" / ".thumbnails" / "t.png")
    dataset = load_dataset(tmp_path)
    assert dataset.classes == ["a", "b"]
    assert not [path for path in all_paths(dataset) if "/." in f"/{path}"]


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.6, 0.5), (1.2, 0.1)])
def test_fractions_that_leave_no_training_images_are_refused(tmp_path: Path, val: float, test: float) -> None:
    make_classes(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(FPTError, match="fractions"):
        load_dataset(tmp_path, val_fraction=val, test_fraction=test)


def test_csv_listing_an_image_twice_is_refused(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    manifest = write_csv(tmp_path / "m.csv", "path,label,split\na.png,x,train\nb.png,y,train\na.png,x,test\n")
    with pytest.raises(FPTError, match=r"m\.csv:4: a\.png is already listed on line 2"):
        load_dataset(manifest)


def test_csv_paths_are_canonical_so_a_dotted_duplicate_across_splits_is_refused(tmp_path: Path) -> None:
    make_classes(tmp_path / "data", {"a": 3, "b": 3})
    text = "path,label,split\n" + "".join(f"data/{c}/{c}_00{i}.png,{c},train\n" for c in "ab" for i in range(3))
    csv = write_csv(tmp_path / "labels.csv", text + "data/../data/a/a_000.png,a,test\n")
    with pytest.raises(FPTError, match=r"labels\.csv:8: data/\.\./data/a/a_000\.png is already listed on line 2"):
        load_dataset(csv)


def test_csv_paths_are_stored_in_canonical_form(tmp_path: Path) -> None:
    make_classes(tmp_path / "data", {"a": 3, "b": 3})
    rows = "".join(f"./data/x/../{c}/{c}_00{i}.png,{c}\n" for c in "ab" for i in range(3))
    dataset = load_dataset(write_csv(tmp_path / "labels.csv", "path,label\n" + rows), 0.25, 0.25)
    assert sorted(all_paths(dataset)) == [f"data/{c}/{c}_00{i}.png" for c in "ab" for i in range(3)]


@pytest.mark.parametrize("outside", ["../elsewhere/a.png", "ABSOLUTE"])
def test_csv_paths_outside_its_folder_are_refused(tmp_path: Path, outside: str) -> None:
    image = write_image(tmp_path / "elsewhere" / "a.png")
    make_classes(tmp_path / "data", {"a": 2, "b": 2})
    listed = str(image) if outside == "ABSOLUTE" else outside
    csv = write_csv(tmp_path / "data" / "labels.csv", f"path,label\na/a_000.png,a\n{listed},a\nb/b_000.png,b\n")
    with pytest.raises(
        FPTError, match=r"labels\.csv:3: .*a\.png lies outside the CSV's folder .*--images-outside-root"
    ):
        load_dataset(csv)


def test_a_file_linked_under_two_names_is_listed_once(tmp_path: Path) -> None:
    make_classes(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "data" / "a" / "link.png").symlink_to(tmp_path / "data" / "b" / "b_000.png")
    text = "path,label\na/a_000.png,a\na/a_001.png,a\nb/b_000.png,b\nb/b_001.png,b\na/link.png,a\n"
    with pytest.raises(FPTError, match=r"a/link\.png is already listed on line 4"):
        load_dataset(write_csv(tmp_path / "data" / "labels.csv", text))


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_a_dataset_with_one_class_is_refused(tmp_path: Path, layout: str) -> None:
    paths = make_classes(tmp_path / "data", {"only": 6})
    source = tmp_path / "data"
    if layout == "csv":
        source = write_csv(tmp_path / "data" / "labels.csv", "path,label\n" + "".join(f"{p},only\n" for p in paths))
    with pytest.raises(FPTError, match=r"has one class \(only\); a classifier needs images of at least two classes"):
        load_dataset(source)


def test_images_outside_the_csvs_folder_are_read_when_allowed_under_a_canonical_path(tmp_path: Path) -> None:
    make_classes(tmp_path / "data", {"a": 3, "b": 3})
    outside = [write_image(tmp_path / "elsewhere" / f"x{i}.png") for i in range(3)]
    rows = "".join(f"{c}/{c}_00{i}.png,{c}\n" for c in "ab" for i in range(3))
    rows += "".join(f"../elsewhere/./x{i}.png,a\n" for i in range(3))
    dataset = load_dataset(write_csv(tmp_path / "data" / "labels.csv", "path,label\n" + rows), images_outside_root=True)
    assert {f"../elsewhere/{path.name}" for path in outside} <= set(all_paths(dataset))
    twice = rows + f"{outside[0]},b\n"  # the same file by its absolute path
    with pytest.raises(FPTError, match="is already listed on line 8"):
        load_dataset(write_csv(tmp_path / "data" / "twice.csv", "path,label\n" + twice), images_outside_root=True)
