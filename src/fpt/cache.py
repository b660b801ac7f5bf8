"""Storage of preloaded LPM features of every image, memory-mapped: the selected keys/values (FPT, FPT+) or a
pooled embedding (the linear probe).

This module only stores and reads records; it knows nothing of models or datasets (``fpt.preload`` runs the
LPM over a dataset and writes here).

A cache directory holds ``manifest.json`` (the fingerprint of everything that determines the features,
and the record layout: named parts and their shapes), ``index.jsonl`` (one line per image: its path relative
to the data root, shard, slot, the SHA-256 of the image file's bytes the features were computed from and the
CRC-32 of the record) and a few large ``shard-NNNNN.bin`` files of fixed-size records (the parts one after
another in the cache dtype, e.g. keys then values, each [L, H, T, d_head]). A compressed cache's records are
each one zstd frame, of its own size: its index lines also give the frame's byte offset and size in the shard,
and the CRC-32 is of the record as decompressed (what is read is what is checked). A record's data is written and
synced before its index line, so an interrupted run (kill -9 included) never leaves a visible half-written
entry; rerunning computes only what the index lacks. An entry belongs to the exact bytes of its image (a
changed or other image under the same path is recomputed or refused, never used), and a record whose bytes no
longer match its checksum is refused when read.

A preload split across processes (torchrun) writes each rank's records to its own ``shard-rR-NNNNN.bin`` files
and its index lines to its own fragment ``index-rR.jsonl``, with the same write order; rank 0, which holds the
cache's lock for the whole job, merges the fragments into ``index.jsonl`` (one atomic replace) at the end, and
any writer merges those an interrupted job left behind before it computes what is missing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fpt.config import CACHE_COMPRESSIONS, CACHE_DTYPE_NAMES
from fpt.errors import FPTError
from fpt.quantization import quantize_int8
from fpt.runtime import progress_bar

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent preloads into one cache are then unsafe
    fcntl = None

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.jsonl"
LOCK_NAME = "cache.lock"
FRAGMENT_GLOB = "index-r*.jsonl"
# 3: compressed records ("layout": {"compression"}), written for compressed caches only, so that an fpt which
# cannot read them refuses the cache instead of finding every record corrupt; 2: the uncompressed format;
# 1: keys and values only, "layout": {"shape", "dtype"}. All three are read.
CACHE_FORMAT = 3
UNCOMPRESSED_FORMAT = 2
SHARD_BYTES = 2 * 2**30
ZSTD_LEVEL = 3  # int8 records: 92.8 % of their bytes at about 1.2 GB/s to decompress (BENCHMARKS.md)
CACHE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in CACHE_DTYPE_NAMES}  # of the parts


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable lines for each fingerprint field that differs."""
    return [
        f"{key}: cache has {found.get(key)!r}, this run needs {expected.get(key)!r}"
        for key in sorted(set(expected) | set(found))
        if expected.get(key) != found.get(key)
    ]


class CacheEntry(NamedTuple):
    shard: str
    slot: int  # the record's place among its shard's records
    sha256: str | None  # content_digest of the image the record was computed from (None: an older fpt)
    crc32: int | None  # of the record's bytes, decompressed (None: an older fpt)
    offset: int | None = None  # a compressed record's first byte in its shard (None: slot * the record's bytes)
    size: int | None = None  # a compressed record's bytes in its shard (None: the layout's record bytes)


@dataclass(frozen=True)
class RecordLayout:
    """The named parts of one image's record and their shapes (e.g. keys and values, each [L, H, T, d_head]),
    stored in one dtype; ``int8`` stores each part as symmetric int8 with a float16 scale per vector of its last
    dimension (per token of each layer and head), as the part ``<name>_scale`` of shape ``shape[:-1]``.
    ``compression`` "zstd" stores each record as one zstd frame (``CACHE_COMPRESSIONS``)."""

    parts: dict[str, tuple[int, ...]]
    dtype: str
    compression: str = "none"

    def __post_init__(self) -> None:
        if self.compression not in CACHE_COMPRESSIONS:
            raise FPTError(f"cache compression '{self.compression}' is not one of {', '.join(CACHE_COMPRESSIONS)}")

    def stored_parts(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored part: name -> (shape, dtype), in record order."""
        stored = {name: (shape, CACHE_DTYPES[self.dtype]) for name, shape in self.parts.items()}
        if self.dtype == "int8":
            stored |= {scale_name(name): (shape[:-1], torch.float16) for name, shape in self.parts.items()}
        return stored

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.stored_parts().values())

    def encode(self, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch of parts ([B, *shape] each, floating) as stored: cast, or quantised with their scales."""
        if self.dtype != "int8":
            return {name: parts[name].to("cpu", CACHE_DTYPES[self.dtype]) for name in self.parts}
        stored = {}
        for name in self.parts:
            values, scales = quantize_int8(parts[name].to("cpu", torch.float32))
            stored[name], stored[scale_name(name)] = values, scales
        return {name: stored[name] for name in self.stored_parts()}

    def to_dict(self) -> dict[str, Any]:
        compression = {} if self.compression == "none" else {"compression": self.compression}
        return {"parts": {name: list(shape) for name, shape in self.parts.items()}, "dtype": self.dtype, **compression}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> RecordLayout:
        layout = manifest["layout"]
        if manifest["format"] == 1:
            shape = tuple(layout["shape"])
            return cls({"keys": shape, "values": shape}, layout["dtype"])
        parts = {name: tuple(shape) for name, shape in layout["parts"].items()}
        return cls(parts, layout["dtype"], layout.get("compression", "none"))


def scale_name(part: str) -> str:
    """The name of a part's int8 scales (a ``Batch`` field too)."""
    return f"{part}_scale"


@dataclass(frozen=True)
class CacheInfo:
    """What ``fpt cache info`` shows of a cache directory."""

    directory: str
    entries: int
    legacy_entries: int  # written by an older fpt without content hash and checksum: the next preload recomputes them
    layout: dict[str, Any]
    record_bytes: int
    bytes_on_disk: int
    fingerprint: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        damaged = FPTError(
            f"{manifest_path} is damaged (not a cache manifest); rebuild the cache with "
            f"`fpt preload ... --cache {directory} --overwrite`"
        )
        try:
            manifest = json.loads(manifest_path.read_bytes())
            version = manifest.get("format")
        except (ValueError, AttributeError):
            raise damaged from None
        if version not in (1, UNCOMPRESSED_FORMAT, CACHE_FORMAT):
            raise FPTError(
                f"{manifest_path} has cache format {version}, this fpt reads 1 to {CACHE_FORMAT}; "
                f"rebuild it with `fpt preload ... --cache {directory} --overwrite`"
            )
        try:
            found, layout = dict(manifest["fingerprint"]), RecordLayout.from_manifest(manifest)
        except (ValueError, KeyError, TypeError, AttributeError, FPTError):
            raise damaged from None
        if fingerprint is not None and found != fingerprint:
            differences = "; ".join(fingerprint_differences(fingerprint, found))
            raise FPTError(
                f"the feature cache at {directory} was built with other settings ({differences}); rebuild it with "
                f"`fpt preload ... --cache {directory} --overwrite` or pass another --cache directory"
            )
        return cls(directory, found, layout)

    @classmethod
    def create(
        cls,
        directory: str | Path,
        fingerprint: dict[str, Any],
        layout: RecordLayout,
        overwrite: bool = False,
        wait: bool = True,
    ) -> FeatureCache:
        """Open the cache at ``directory`` for these settings, creating it if absent.

        An existing cache with another fingerprint is refused unless ``overwrite``, which empties it. Creating
        takes the cache's lock: while another process holds it, this waits, or with ``wait=False`` raises.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FPTError(f"the cache path {directory} is a file, not a directory; pass another --cache")
        if (directory / MANIFEST_NAME).is_file() and not overwrite:
            return cls.open(directory, fingerprint)
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory, wait):  # a preload into this cache waits until it is built
            if (directory / MANIFEST_NAME).is_file() and not overwrite:  # another process built it meanwhile
                return cls.open(directory, fingerprint)
            # the manifest goes first: an interrupted --overwrite leaves no cache rather than a mix, and records
            # found without a manifest (such a leftover) cannot be trusted, so they go too
            (directory / MANIFEST_NAME).unlink(missing_ok=True)
            for path in directory.iterdir():
                if path.name == INDEX_NAME or path.name.startswith("shard-") or path.match(FRAGMENT_GLOB):
                    path.unlink()
            version = UNCOMPRESSED_FORMAT if layout.compression == "none" else CACHE_FORMAT
            manifest = {"format": version, "fingerprint": fingerprint, "layout": layout.to_dict()}
            try:
                _write_atomically(directory / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise disk_full_error(directory, cached=0) from None
                raise
        return cls(directory, fingerprint, layout)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def missing(self, digests: Mapping[str, str]) -> list[str]:
        """The keys of ``digests`` (key -> ``content_digest`` of its image now) without an entry for exactly
        those bytes: never cached, or the image changed since (replaced in place, or another dataset's image
        under the same relative path)."""
        return [key for key, digest in digests.items() if key not in self.entries or self.entries[key].sha256 != digest]

    def require_current(self, root: Path, keys: Sequence[str], digests: Mapping[str, str] | None = None) -> None:
        """Raise unless every image ``root / key`` is cached from exactly its current bytes (``digests``: their
        ``content_digests``, when already computed)."""
        stale = self.missing(content_digests(root, keys) if digests is None else {key: digests[key] for key in keys})
        if stale:
            shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
            raise FPTError(
                f"{len(stale)} images are not cached as they are now in {root} ({shown}: changed since, or never "
                f"cached); recompute them with `fpt preload` (the run's options and --cache {self.directory})"
            )

    def info(self) -> CacheInfo:
        return CacheInfo(
            directory=str(self.directory),
            entries=len(self.entries),
            legacy_entries=sum(1 for entry in self.entries.values() if entry.sha256 is None or entry.crc32 is None),
            layout=self.layout.to_dict(),
            record_bytes=self.layout.nbytes,
            bytes_on_disk=self.size_on_disk(),
            fingerprint=self.fingerprint,
        )

    def verify(self, progress: bool = False) -> list[str]:
        """Read every record against its checksum and drop the corrupt ones (the index is rewritten atomically,
        under the cache's lock), so that the next preload recomputes them; returns their keys."""
        with self.writer():  # reloads the index under the lock
            corrupt = []
            bar = progress_bar(list(self.entries), unit="record", desc="verify", enabled=progress)
            for key in bar:
                try:
                    self.get(key)
                except FPTError:
                    corrupt.append(key)
            if corrupt:
                dropped = set(corrupt)
                kept = {key: entry for key, entry in self.entries.items() if key not in dropped}
                _rewrite_index(self.directory / INDEX_NAME, kept)
                self.entries = kept
        return corrupt

    def size_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())

    def get(self, key: str) -> dict[str, Tensor]:
        """The cached parts of one image (e.g. ``keys`` and ``values``, each [L, H, T, d_head]) in the cache dtype."""
        if key not in self.entries:
            raise FPTError(
                f"image '{key}' is not in the feature cache {self.directory}; run `fpt preload` again to add it"
            )
        entry = self.entries[key]
        if entry.shard not in self._shards:  # opened lazily, so that each DataLoader worker maps its own
            self._shards[entry.shard] = np.memmap(self.directory / entry.shard, dtype=np.uint8, mode="r")
        size = self.layout.nbytes
        if self.layout.compression == "none":
            stored = self._shards[entry.shard][entry.slot * size : (entry.slot + 1) * size]
            record = np.array(stored) if len(stored) == size else None
            problem = "is truncated"
        else:
            stored = self._shards[entry.shard][entry.offset or 0 : (entry.offset or 0) + (entry.size or 0)]
            record = _decompress(stored, size)
            problem = "does not decompress"
        if record is not None and entry.crc32 is not None and zlib.crc32(record) != entry.crc32:
            record, problem = None, "fails its checksum"
        if record is None:
            raise FPTError(
                f"the cached features of '{key}' in {self.directory} are corrupt ({entry.shard} slot {entry.slot} "
                f"{problem}); `fpt cache verify {self.directory}` drops every corrupt record and the next "
                "`fpt preload` recomputes them"
            )
        parts, offset = {}, 0
        for name, (shape, dtype) in self.layout.stored_parts().items():
            size = math.prod(shape) * dtype.itemsize
            parts[name] = torch.from_numpy(record[offset : offset + size]).view(dtype).view(shape)
            offset += size
        return parts

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}

    @contextmanager
    def writer(self, rank: int | None = None, wait: bool = True) -> Iterator[CacheWriter]:
        """A writer that holds the cache's lock (waiting for it, or with ``wait=False`` raising while another
        process holds it); with ``rank``, the writer of that rank's own shards and index fragment in a
        distributed preload, which takes no lock: that job's rank 0 holds it."""
        writer = CacheWriter(self, rank, wait)
        try:
            yield writer
        finally:
            writer.close()


class CacheWriter:
    """Appends records to a fresh shard of ``cache``; each batch is synced before it is indexed.

    Args:
        cache: the cache.
        rank: None for the writer that holds the cache's lock and writes ``index.jsonl`` (it first merges the
            fragments an interrupted distributed preload left); a rank's number for a writer of that rank's own
            fragment, in a distributed preload whose rank 0 holds the lock.
    """

    def __init__(self, cache: FeatureCache, rank: int | None = None, wait: bool = True) -> None:
        self.cache = cache
        self.lock = _lock(cache.directory, wait) if rank is None else None
        self.prefix = "shard-" if rank is None else f"shard-r{rank}-"
        self.index_path = cache.directory / (INDEX_NAME if rank is None else fragment_name(rank))
        _drop_partial_last_line(self.index_path)
        self.index: BinaryIO = open(self.index_path, "ab")  # noqa: SIM115 (closed in close())
        if rank is None:
            self.merge_fragments()  # reads what writers before us added
        self.shard: BinaryIO | None = None
        self.shard_name = ""
        self.slots = 0
        self.position = 0  # bytes written to the shard

    def merge_fragments(self, ranks: Sequence[int] = ()) -> None:
        """Merge every rank's index fragment into ``index.jsonl`` (one atomic replace), then remove them. The
        fragments of ``ranks`` are opened by name (a network filesystem may not list a file another node just
        wrote), any others found by listing the directory. Only the writer that holds the lock merges."""
        if self.lock is None:
            raise FPTError("only the writer that holds the cache's lock merges index fragments")
        directory = self.cache.directory
        named = [directory / fragment_name(rank) for rank in ranks]
        fragments = sorted({*directory.glob(FRAGMENT_GLOB), *(path for path in named if path.is_file())})
        entries = _read_index(directory / INDEX_NAME)
        if fragments:
            for fragment in fragments:
                entries.update(_read_index(fragment))
            entries = _unshared(entries)
            self.index.close()
            try:
                _rewrite_index(directory / INDEX_NAME, entries)  # a crash before the unlinks merges them again
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise disk_full_error(directory, cached=len(self.cache)) from None
                raise
            for fragment in fragments:
                fragment.unlink()
            self.index = open(directory / INDEX_NAME, "ab")  # noqa: SIM115 (closed in close())
        self.cache.entries = entries

    def add(self, keys: Sequence[str], parts: dict[str, Tensor], digests: Sequence[str]) -> None:
        """Store a batch: image keys, their parts ([B, *shape] each, named as in the layout) and the
        ``content_digest`` of each image file the parts were computed from."""
        layout = self.cache.layout
        if set(parts) != set(layout.parts):
            raise FPTError(f"cache record parts {sorted(parts)} do not match the layout's {sorted(layout.parts)}")
        stored = layout.encode(parts)
        finite = _all_finite(stored)  # int8 too: a NaN or inf part has a NaN or inf scale
        if not finite.all():
            bad = [key for key, ok in zip(keys, finite.tolist(), strict=True) if not ok]
            raise FPTError(
                f"the LPM's features of {', '.join(bad[:3])} are not finite in {layout.dtype} (an overflow, or NaN in "
                "the image or the LPM's weights); use --cache-dtype float32, or check those images"
            )
        data = torch.cat([part.reshape(len(keys), -1).view(torch.uint8) for part in stored.values()], dim=1).numpy()
        checksums = [zlib.crc32(row) for row in data]
        compressed = layout.compression != "none"
        blobs = _compress_records(data) if compressed else [data.tobytes()]
        try:
            if self.shard is None or self.position + sum(map(len, blobs)) > SHARD_BYTES:
                self._next_shard()
            for blob in blobs:
                self.shard.write(blob)
            self.shard.flush()
            os.fsync(self.shard.fileno())
            starts = np.cumsum([self.position, *map(len, blobs)]).tolist()
            entries = [
                CacheEntry(self.shard_name, self.slots + i, digest, checksum)._replace(
                    **({"offset": starts[i], "size": len(blobs[i])} if compressed else {})
                )
                for i, (digest, checksum) in enumerate(zip(digests, checksums, strict=True))
            ]
            lines = [json.dumps(_index_line(key, entry)) + "\n" for key, entry in zip(keys, entries, strict=True)]
            self.index.write("".join(lines).encode())
            self.index.flush()
            os.fsync(self.index.fileno())
        except OSError as error:
            self._abandon_shard()
            if error.errno == errno.ENOSPC:
                raise disk_full_error(self.cache.directory, cached=len(self.cache)) from None
            raise
        self.cache.entries.update(zip(keys, entries, strict=True))
        self.slots += len(keys)
        self.position = starts[-1]

    def _next_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)\.bin")
        names = (pattern.fullmatch(path.name) for path in self.cache.directory.glob(f"{self.prefix}*.bin"))
        numbers = [int(match.group(1)) for match in names if match]
        self.shard_name = f"{self.prefix}{max(numbers, default=-1) + 1:05d}.bin"
        self.shard = open(self.cache.directory / self.shard_name, "xb")  # noqa: SIM115 (closed in close())
        self.slots = 0
        self.position = 0

    def _abandon_shard(self) -> None:
        """After a failed write: the shard may end in part of a batch, so the next batch starts a fresh one."""
        if self.shard is not None:
            with suppress(OSError):  # closing flushes, which fails again on a full disk
                self.shard.close()
        self.shard = None

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
        self.index.close()
        if self.lock is not None:
            self.lock.close()  # releases the lock


def _all_finite(stored: dict[str, Tensor]) -> Tensor:
    """[B] whether every floating value of each record is finite."""
    checks = [
        torch.isfinite(part.reshape(len(part), -1)).all(dim=1) for part in stored.values() if part.is_floating_point()
    ]
    return torch.stack(checks).all(dim=0)


def disk_full_error(directory: Path, cached: int) -> FPTError:
    return FPTError(
        f"disk full while writing the feature cache {directory}; the {cached} images cached so far are kept: "
        "free space and rerun to continue"
    )


def content_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes: what a cache entry is tied to."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(2**20):
                digest.update(chunk)
        return digest.hexdigest()
    except FileNotFoundError:
        raise FPTError(f"image not found: {path}") from None
    except OSError as error:
        raise FPTError(f"cannot read image {path} ({error.strerror}); fix or replace the file") from None


def content_digests(root: Path, keys: Sequence[str], progress: bool = False) -> dict[str, str]:
    """``content_digest`` of every image ``root / key``, hashed on a few threads (hashing releases the GIL)."""
    bar = progress_bar(total=len(keys), unit="img", desc="hashing", enabled=progress and len(keys) > 1000)
    with bar, ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        digests = {}
        for key, digest in zip(keys, pool.map(lambda key: content_digest(root / key), keys), strict=True):
            digests[key] = digest
            bar.update(1)
    return digests


def _compress_records(data: np.ndarray) -> list[bytes]:
    """Each row of ``data`` [B, record bytes] uint8 as one zstd frame."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return [compressor.compress(row) for row in data]


def _decompress(frame: np.ndarray, size: int) -> np.ndarray | None:
    """The record of ``size`` bytes in a zstd ``frame`` (uint8), decompressed into a new writable array; None for a
    damaged frame (or one of another size, checked before anything is allocated for it)."""
    import zstandard

    try:
        if zstandard.frame_content_size(frame) != size:
            return None
        record = np.empty(size, dtype=np.uint8)
        filled, view = 0, memoryview(record)
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            while filled < size and (read := reader.readinto(view[filled:])):
                filled += read
    except zstandard.ZstdError:
        return None
    return record if filled == size else None


def _index_line(key: str, entry: CacheEntry) -> dict[str, Any]:
    line = {"key": key, "shard": entry.shard, "slot": entry.slot, "sha256": entry.sha256, "crc32": entry.crc32}
    return line if entry.offset is None else {**line, "offset": entry.offset, "size": entry.size}


def fragment_name(rank: int) -> str:
    """The index fragment of ``rank`` in a distributed preload."""
    return f"index-r{rank}.jsonl"


def _lock(directory: Path, wait: bool = True) -> BinaryIO:
    """The cache's lock file, held exclusively until the returned handle is closed: a second writer waits, or
    with ``wait=False`` is refused."""
    handle = open(directory / LOCK_NAME, "ab")  # noqa: SIM115 (the caller closes it)
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FPTError(
                f"another preload is writing the feature cache {directory} (it holds {LOCK_NAME}); rerun when it "
                "has finished, which reuses its work"
            ) from None
    return handle


@contextmanager
def _locked(directory: Path, wait: bool = True) -> Iterator[None]:
    handle = _lock(directory, wait)
    try:
        yield
    finally:
        handle.close()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader (or a crash) sees its old content or the new one, never a part."""
    temporary = path.with_name(f"{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _rewrite_index(path: Path, entries: dict[str, CacheEntry]) -> None:
    """Replace the index by one of ``entries``, atomically."""
    _write_atomically(
        path, "".join(json.dumps(_index_line(key, entry)) + "\n" for key, entry in entries.items()).encode()
    )


def _read_index(path: Path) -> dict[str, CacheEntry]:
    """The entries of an index. A damaged line (undecodable, or not an entry) is skipped and entries that share a
    record are all dropped: their images count as not cached, so the next preload recomputes them."""
    entries: dict[str, CacheEntry] = {}
    if not path.is_file():
        return entries
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):  # the unfinished tail of an interrupted write
                break
            try:
                item = json.loads(line)
                offset, size = item.get("offset"), item.get("size")
                entry = CacheEntry(
                    str(item["shard"]),
                    int(item["slot"]),
                    item.get("sha256"),
                    item.get("crc32"),
                    None if offset is None else int(offset),
                    None if size is None else int(size),
                )
                entries[str(item["key"])] = entry
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return _unshared(entries)


def _unshared(entries: dict[str, CacheEntry]) -> dict[str, CacheEntry]:
    """``entries`` without those that share a record with another (all of them are dropped)."""
    holders = Counter((entry.shard, entry.slot) for entry in entries.values())
    return {key: entry for key, entry in entries.items() if holders[(entry.shard, entry.slot)] == 1}


def _drop_partial_last_line(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
