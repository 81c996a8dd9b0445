"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files, gzip)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} not found. Fashion-MNIST comes from Debian's package `dataset-fashion-mnist` "
        f"(`apt-get install dataset-fashion-mnist`, done by `make setup`); the directory is the "
        f"param `data.fashion_mnist_dir`."
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (big-endian header: magic, dims...) into a uint8 array."""
    if not path.is_file():
        raise _missing(path)
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    found = int.from_bytes(raw[0:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad idx magic {found}, expected {magic}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated, expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def load_split(directory: str | Path, split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (n, R, R, 1), each 28x28 digit-style image centred in an R x R black frame."""
    images_name, labels_name = FILES[split]
    directory = Path(directory)
    images = read_idx(directory / images_name, _IMAGE_MAGIC)  # (n, 28, 28)
    labels = read_idx(directory / labels_name, _LABEL_MAGIC).astype(np.int64)  # (n,)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split}")
    size = images.shape[1]
    if resolution < size:
        raise ValueError(f"data.resolution={resolution} is smaller than the {size}x{size} Fashion-MNIST images")
    top = (resolution - size) // 2
    framed = np.zeros((len(images), resolution, resolution, 1), dtype=np.uint8)
    framed[:, top:top + size, top:top + size, 0] = images
    return framed, labels
