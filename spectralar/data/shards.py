"""Prepared-dataset format: image shards plus one manifest.

Layout of a prepared dataset directory::

    manifest.json                 classes, image shape, counts, checksums, skipped files
    train/shard-00000.npy         raw:  uint8 (n, H, W, C), memory-mapped on read
    train/shard-00000.bin         jpeg: concatenated JPEG files ...
    train/shard-00000.offsets.npy       ... and int64 (n + 1,) byte offsets into it
    train/shard-00000.labels.npy  int16 (n,) class indices
    val/...

Every shard's entry in the manifest holds its image count and a sha256 of its content; the reader
checks sizes, shapes, dtypes and label ranges whenever it opens a file, and the content hash as
``SPECTRALAR_VERIFY`` says (``spectralar.io``: by default for splits up to 4 GiB).

Raw shards stream at memory speed; JPEG shards (ImageNet: 1.28M images at 256 px, about 30 KB
each at quality 95, i.e. ~40 GB instead of 252 GB raw) decode at the rate measured in the README.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from spectralar.io import ArtifactError, hash_on_open, read_manifest, read_npy, rerun_hint

MANIFEST = "manifest.json"
DTYPES = {"images": "uint8", "labels": "int16", "offsets": "int64"}  # as ShardWriter writes them
_HASH_ROWS = 4096  # images hashed per read when checking a raw shard (bounded memory)


@dataclass(frozen=True)
class ShardInfo:
    stem: str  # e.g. "train/shard-00000", relative to the dataset root
    count: int
    sha256: str  # of the images (raw arrays or concatenated JPEG bytes), then the int16 labels
    offsets_sha256: str = ""  # jpeg: of the int64 offsets


def _check_inside(stem: str, manifest_path: Path) -> None:
    """Refuse a shard stem that would read outside the dataset folder (absolute, or with ``..``):
    the manifest is data, and a stem is always a path inside its folder, e.g. ``train/shard-00000``.
    Checked on the words of the path, not by resolving it, so a DVC cache of symlinks still reads."""
    path = Path(stem)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ArtifactError(f"{manifest_path}: shard stem {stem!r} is not a path inside {manifest_path.parent} "
                            f"(expected e.g. 'train/shard-00000'); refusing to read it")


def decode_jpeg(data: bytes | memoryview, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        array = np.asarray(image, dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


class ImageShards:
    """Random and sequential access to one split of a prepared dataset.

    ``images(indices)`` returns uint8 (n, H, W, C); ``labels`` is an int64 array of all labels.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: run the `prepare` stage first (python -m spectralar prepare)"
            )
        self.rerun = rerun_hint("prepare", self.root)
        self.manifest = read_manifest(manifest_path, self.rerun)
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in {manifest_path} (has {sorted(self.manifest['splits'])})")
        self.split = split
        self.format: str = self.manifest["format"]
        self.image_shape: tuple[int, int, int] = tuple(self.manifest["image_shape"])  # (H, W, C)
        self.class_names: list[str] = list(self.manifest["class_names"])
        entry = self.manifest["splits"][split]
        self.shards = [ShardInfo(**s) for s in entry["shards"]]
        for shard in self.shards:
            _check_inside(shard.stem, manifest_path)
        self._check_split_digest(entry, manifest_path)
        counts = np.array([s.count for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._shard_labels = [self._labels_of(s) for s in self.shards]  # as stored: part of the content hash
        self.labels = (
            np.concatenate(self._shard_labels).astype(np.int64) if self.shards else np.zeros(0, dtype=np.int64)
        )
        self.hashed = hash_on_open(len(self) * int(np.prod(self.image_shape)))  # content hash on first access
        self._cache: dict[int, tuple[np.ndarray, Optional[np.ndarray]]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, k: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if k not in self._cache:
            stem = self.root / self.shards[k].stem
            count = self.shards[k].count
            if self.format == "raw":
                data = read_npy(f"{stem}.npy", mmap=True, rerun=self.rerun)
                self._check_shape(f"{stem}.npy", data, (count, *self.image_shape), "images")
                offsets = None
            else:
                offsets = read_npy(f"{stem}.offsets.npy", rerun=self.rerun)
                self._check_shape(f"{stem}.offsets.npy", offsets, (count + 1,), "offsets")
                size = Path(f"{stem}.bin").stat().st_size
                decreasing = bool(np.any(np.diff(offsets) < 0))
                if size != offsets[-1] or offsets[0] != 0 or decreasing:
                    raise ArtifactError(f"{stem}.bin: {size} bytes, but its offsets run {offsets[0]}..{offsets[-1]}"
                                        f"{' and decrease' if decreasing else ''} (truncated?); {self.rerun}")
                data = np.memmap(f"{stem}.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
            if self.hashed:
                self._check_content(k, data, offsets)
            self._cache[k] = (data, offsets)
        return self._cache[k]

    def _check_content(self, k: int, data: np.ndarray, offsets: Optional[np.ndarray]) -> None:
        """The shard's sha256, as ShardWriter computed it: its images (or JPEG bytes), then its labels."""
        shard, stem = self.shards[k], self.root / self.shards[k].stem
        digest = hashlib.sha256()
        step = _HASH_ROWS if offsets is None else _HASH_ROWS * 4096  # images, or JPEG bytes
        for start in range(0, len(data), step):
            digest.update(np.ascontiguousarray(data[start:start + step]))
        digest.update(self._shard_labels[k].tobytes())
        if digest.hexdigest() != shard.sha256:
            name = f"{stem}.npy" if offsets is None else f"{stem}.bin"
            raise ArtifactError(f"{name}: content (with {stem}.labels.npy) does not match its sha256 in "
                                f"{self.root / MANIFEST} (a damaged or replaced file); {self.rerun}")
        if offsets is not None and hashlib.sha256(offsets.tobytes()).hexdigest() != shard.offsets_sha256:
            raise ArtifactError(f"{stem}.offsets.npy: does not match its sha256 in {self.root / MANIFEST}; "
                                f"{self.rerun}")

    def _check_split_digest(self, entry: dict, manifest_path: Path) -> None:
        """The split's sha256 (what extract_proxy_codes records as ``data_sha256``) is that of its shards' own."""
        combined = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()
        if combined != entry.get("sha256"):
            raise ArtifactError(f"{manifest_path}: the {self.split} split's sha256 does not match its shards' "
                                f"(an edited manifest); {self.rerun}")

    def _labels_of(self, shard: ShardInfo) -> np.ndarray:
        """A shard's labels as stored (int16), each a class of the manifest."""
        path = self.root / f"{shard.stem}.labels.npy"
        labels = read_npy(path, rerun=self.rerun)
        self._check_shape(str(path), labels, (shard.count,), "labels")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ArtifactError(f"{path}: labels {labels.min()}..{labels.max()}, but {self.root / MANIFEST} has "
                                f"{self.num_classes} classes (0..{self.num_classes - 1}); {self.rerun}")
        return labels

    def _check_shape(self, path: str, array: np.ndarray, expected: tuple[int, ...], kind: str) -> None:
        """A shard that parses but does not hold what the manifest says (another run's file) stops here."""
        if array.shape != expected:
            raise ArtifactError(f"{path}: shape {array.shape}, but {self.root / MANIFEST} says {expected}; "
                                f"{self.rerun}")
        dtype = self.manifest.get("dtypes", DTYPES)[kind]
        if array.dtype != np.dtype(dtype):
            raise ArtifactError(f"{path}: dtype {array.dtype}, but {self.root / MANIFEST} says {dtype}; {self.rerun}")

    def _image(self, index: int) -> np.ndarray:
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        local = index - int(self._starts[k])
        data, offsets = self._shard(k)
        if offsets is None:
            return np.asarray(data[local])
        return decode_jpeg(memoryview(data[offsets[local]:offsets[local + 1]]), self.image_shape[2])

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, C) for the given indices (any order)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for split {self.split!r} of size {len(self)}")
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        if self.format == "raw" and len(indices) and np.all(np.diff(indices) == 1):
            self._copy_range(int(indices[0]), int(indices[-1]) + 1, out)
            return out
        for row, index in enumerate(indices):
            out[row] = self._image(int(index))
        return out

    def _copy_range(self, start: int, stop: int, out: np.ndarray) -> None:
        row = 0
        while start < stop:
            k = int(np.searchsorted(self._starts, start, side="right") - 1)
            local = start - int(self._starts[k])
            take = min(stop - start, int(self._starts[k + 1]) - start)
            out[row:row + take] = self._shard(k)[0][local:local + take]
            row, start = row + take, start + take

    def spread(self, count: int) -> np.ndarray:
        """``count`` indices spread evenly over the split (all of it when ``count`` >= its size).

        Evaluation subsets use this, not the first ``count`` images: an ImageFolder split is stored
        class by class, so its first 10k images would hold a few classes only. Deterministic.
        """
        total = len(self)
        if count >= total:
            return np.arange(total)
        return np.floor(np.arange(count) * (total / count)).astype(np.int64)

    def load_all(self) -> np.ndarray:
        return self.images(np.arange(len(self)))

    def iter_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            index = np.arange(start, min(start + batch_size, len(self)))
            yield self.images(index), self.labels[index]
