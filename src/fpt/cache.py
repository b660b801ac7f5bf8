"""Storage of preloaded LPM features of every image, memory-mapped: the selected keys/values (FPT, FPT+) or a
pooled embedding (the linear probe).

This module only stores and reads records; it knows nothing of models or datasets (``fpt.preload`` runs the
LPM over a dataset and writes here).

A cache directory holds ``manifest.json`` (the fingerprint of everything that determines the features,
and the record layout: named parts and their shapes), ``index.jsonl`` (one line per image: its path relative
to the data root, shard and slot) and a few large ``shard-NNNNN.bin`` files of fixed-size records (the
parts one after another in the cache dtype, e.g. keys then values, each [L, H, T, d_head]). A record's data is
written and synced before its index line, so an interrupted run (kill -9 included) never leaves a visible
half-written entry; rerunning computes only what the index lacks.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fpt.config import CACHE_DTYPE_NAMES
from fpt.errors import FPTError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent preloads into one cache are then unsafe
    fcntl = None

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.jsonl"
LOCK_NAME = "cache.lock"
CACHE_FORMAT = 2  # 1: keys and values only, "layout": {"shape", "dtype"}; still read
SHARD_BYTES = 2 * 2**30
CACHE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in CACHE_DTYPE_NAMES}


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable lines for each fingerprint field that differs."""
    return [
        f"{key}: cache has {found.get(key)!r}, this run needs {expected.get(key)!r}"
        for key in sorted(set(expected) | set(found))
        if expected.get(key) != found.get(key)
    ]


class CacheEntry(NamedTuple):
    shard: str
    slot: int
    stamp: list[int] | None  # file_stamp of the image when it was cached


@dataclass(frozen=True)
class RecordLayout:
    """The named parts of one image's record and their shapes (e.g. keys and values, each [L, H, T, d_head]),
    all in one dtype."""

    parts: dict[str, tuple[int, ...]]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.parts.values()) * self.torch_dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"parts": {name: list(shape) for name, shape in self.parts.items()}, "dtype": self.dtype}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> RecordLayout:
        layout = manifest["layout"]
        if manifest["format"] == 1:
            shape = tuple(layout["shape"])
            return cls({"keys": shape, "values": shape}, layout["dtype"])
        return cls({name: tuple(shape) for name, shape in layout["parts"].items()}, layout["dtype"])


class FeatureCache:
    """Read and append access to a cache directory. Keys are image paths relative to the data root."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], layout: RecordLayout) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.layout = layout
        self.entries: dict[str, CacheEntry] = _read_index(directory / INDEX_NAME)
        self._shards: dict[str, np.memmap] = {}

    @classmethod
    def open(cls, directory: str | Path, fingerprint: dict[str, Any] | None = None) -> FeatureCache:
        """Open an existing cache; with ``fingerprint``, refuse one built with different settings."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FPTError(f"no feature cache at {directory} (no {MANIFEST_NAME}); build it with `fpt preload`")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") not in (1, CACHE_FORMAT):
            raise FPTError(
                f"{manifest_path} has cache format {manifest.get('format')}, this fpt reads 1 and {CACHE_FORMAT}; "
                f"rebuild it with `fpt preload ... --cache {directory} --overwrite`"
            )
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            differences = "; ".join(fingerprint_differences(fingerprint, manifest["fingerprint"]))
            raise FPTError(
                f"the feature cache at {directory} was built with other settings ({differences}); rebuild it with "
                f"`fpt preload ... --cache {directory} --overwrite` or pass another --cache directory"
            )
        return cls(directory, manifest["fingerprint"], RecordLayout.from_manifest(manifest))

    @classmethod
    def create(
        cls, directory: str | Path, fingerprint: dict[str, Any], layout: RecordLayout, overwrite: bool = False
    ) -> FeatureCache:
        """Open the cache at ``directory`` for these settings, creating it if absent.

        An existing cache with another fingerprint is refused unless ``overwrite``, which empties it.
        """
        directory = Path(directory)
        if (directory / MANIFEST_NAME).is_file():
            if not overwrite:
                return cls.open(directory, fingerprint)
            for path in directory.iterdir():
                if path.name in (MANIFEST_NAME, INDEX_NAME) or path.name.startswith("shard-"):
                    path.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "layout": layout.to_dict()}
        temporary = directory / f"{MANIFEST_NAME}.tmp"
        try:
            temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise disk_full_error(directory, cached=0) from None
            raise
        temporary.replace(directory / MANIFEST_NAME)
        return cls(directory, fingerprint, layout)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def missing(self, keys: Sequence[str], root: Path | None = None) -> list[str]:
        """Keys without an entry; with the data ``root``, also those whose image file changed since caching
        (another dataset with the same relative paths, or an image replaced in place)."""
        return [
            key
            for key in keys
            if key not in self.entries or (root is not None and self.entries[key].stamp != file_stamp(root / key))
        ]

    def size_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())

    def get(self, key: str) -> dict[str, Tensor]:
        """The cached parts of one image (e.g. ``keys`` and ``values``, each [L, H, T, d_head]) in the cache dtype."""
        try:
            shard, slot, _ = self.entries[key]
        except KeyError:
            raise FPTError(
                f"image '{key}' is not in the feature cache {self.directory}; run `fpt preload` again to add it"
            ) from None
        if shard not in self._shards:  # opened lazily, so that each DataLoader worker maps its own
            self._shards[shard] = np.memmap(self.directory / shard, dtype=np.uint8, mode="r")
        size = self.layout.nbytes
        raw = torch.from_numpy(np.array(self._shards[shard][slot * size : (slot + 1) * size]))
        flat = raw.view(self.layout.torch_dtype)
        sizes = [int(np.prod(shape)) for shape in self.layout.parts.values()]
        return {
            name: part.view(shape)
            for (name, shape), part in zip(self.layout.parts.items(), flat.split(sizes), strict=True)
        }

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}

    @contextmanager
    def writer(self) -> Iterator[CacheWriter]:
        writer = CacheWriter(self)
        try:
            yield writer
        finally:
            writer.close()


class CacheWriter:
    """Appends records to a fresh shard of ``cache``; each batch is synced before it is indexed."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self.lock = open(cache.directory / LOCK_NAME, "a")  # noqa: SIM115 (closed in close())
        if fcntl is not None:
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        cache.entries = _read_index(cache.directory / INDEX_NAME)  # what writers before us added
        _drop_partial_last_line(cache.directory / INDEX_NAME)
        self.index: BinaryIO = open(cache.directory / INDEX_NAME, "ab")  # noqa: SIM115 (closed in close())
        self.shard: BinaryIO | None = None
        self.shard_name = ""
        self.slots = 0

    def add(
        self, keys: Sequence[str], parts: dict[str, Tensor], stamps: Sequence[list[int] | None] | None = None
    ) -> None:
        """Store a batch: image keys, their parts ([B, *shape] each, named as in the layout) and their files'
        ``file_stamp``."""
        stamps = stamps if stamps is not None else [None] * len(keys)
        layout = self.cache.layout
        if set(parts) != set(layout.parts):
            raise FPTError(f"cache record parts {sorted(parts)} do not match the layout's {sorted(layout.parts)}")
        flat = [parts[name].reshape(len(keys), -1) for name in layout.parts]
        records = torch.cat(flat, dim=1).to("cpu", layout.torch_dtype).contiguous()
        data = records.view(torch.uint8).numpy()
        try:
            if self.shard is None or (self.slots + len(keys)) * layout.nbytes > SHARD_BYTES:
                self._next_shard()
            self.shard.write(data.tobytes())
            self.shard.flush()
            os.fsync(self.shard.fileno())
            lines = [
                json.dumps({"key": key, "shard": self.shard_name, "slot": self.slots + i, "stamp": stamp}) + "\n"
                for i, (key, stamp) in enumerate(zip(keys, stamps, strict=True))
            ]
            self.index.write("".join(lines).encode())
            self.index.flush()
            os.fsync(self.index.fileno())
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise disk_full_error(self.cache.directory, cached=len(self.cache)) from None
            raise
        for i, (key, stamp) in enumerate(zip(keys, stamps, strict=True)):
            self.cache.entries[key] = CacheEntry(self.shard_name, self.slots + i, stamp)
        self.slots += len(keys)

    def _next_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
        existing = sorted(self.cache.directory.glob("shard-*.bin"))
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.shard_name = f"shard-{number:05d}.bin"
        self.shard = open(self.cache.directory / self.shard_name, "xb")  # noqa: SIM115 (closed in close())
        self.slots = 0

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
        self.index.close()
        self.lock.close()  # releases the lock


def disk_full_error(directory: Path, cached: int) -> FPTError:
    return FPTError(
        f"disk full while writing the feature cache {directory}; the {cached} images cached so far are kept: "
        "free space and rerun to continue"
    )


def file_stamp(path: Path) -> list[int]:
    """[size, modification time in ns] of an image file: changes when the file is replaced."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _read_index(path: Path) -> dict[str, CacheEntry]:
    entries: dict[str, CacheEntry] = {}
    if not path.is_file():
        return entries
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):  # the unfinished tail of an interrupted write
                break
            entry = json.loads(line)
            entries[entry["key"]] = CacheEntry(entry["shard"], entry["slot"], entry.get("stamp"))
    return entries


def _drop_partial_last_line(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
