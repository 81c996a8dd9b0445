"""Streaming writer of image shards (see ``spectralar.data.shards`` for the layout)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from spectralar.io import write_npy, atomic_path


class ShardWriter:
    """Append images one at a time; every ``shard_size`` images become one shard on disk.

    ``fmt="raw"`` takes uint8 (H, W, C) arrays; ``fmt="jpeg"`` takes encoded JPEG bytes.
    Output is a pure function of the appended sequence, so reruns are byte-identical. Each shard's
    manifest entry holds its count and the sha256 of its content (images or JPEG bytes, then the
    int16 labels; for JPEG also of the offsets), which ``ImageShards`` checks on open.
    """

    def __init__(self, root: Path, split: str, *, fmt: str, shard_size: int) -> None:
        self.root, self.split, self.fmt, self.shard_size = Path(root), split, fmt, shard_size
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._items: list = []
        self._labels: list[int] = []
        self.count = 0

    def append(self, item: np.ndarray | bytes, label: int) -> None:
        self._items.append(item)
        self._labels.append(label)
        self.count += 1
        if len(self._items) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._items:
            return
        stem = f"{self.split}/shard-{len(self.shards):05d}"
        base = self.root / stem
        labels = np.asarray(self._labels, dtype=np.int16)
        digest = hashlib.sha256()
        if self.fmt == "raw":
            images = np.stack(self._items).astype(np.uint8, copy=False)
            write_npy(f"{base}.npy", images)
            digest.update(np.ascontiguousarray(images).tobytes())
        else:
            offsets = np.zeros(len(self._items) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(b) for b in self._items])
            with atomic_path(f"{base}.bin") as tmp:
                with open(tmp, "wb") as handle:
                    for blob in self._items:
                        handle.write(blob)
                        digest.update(blob)
            write_npy(f"{base}.offsets.npy", offsets)
        write_npy(f"{base}.labels.npy", labels)
        digest.update(labels.tobytes())
        shard = {"stem": stem, "count": len(self._items), "sha256": digest.hexdigest()}
        if self.fmt == "jpeg":  # the offsets are outside the content hash: a damaged one would misplace images
            shard["offsets_sha256"] = hashlib.sha256(offsets.tobytes()).hexdigest()
        self.shards.append(shard)
        self._items, self._labels = [], []

    def close(self) -> dict:
        self.flush()
        content = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()
        return {"count": self.count, "shards": self.shards, "sha256": content}
