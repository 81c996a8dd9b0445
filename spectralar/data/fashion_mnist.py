"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files, gzip)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from spectralar.io import ArtifactError

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


# Debian's package installs these files; a damaged copy is fixed by reinstalling it.
_REINSTALL = "reinstall the package: `apt-get install --reinstall dataset-fashion-mnist`"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (big-endian header: magic, dims...) into a uint8 array."""
    if not path.is_file():
        raise _missing(path)
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # not gzip or bad CRC, truncated stream, bad data
        raise ArtifactError(f"{path}: not a complete gzip file ({type(err).__name__}: {err}); {_REINSTALL}") from err
    found = int.from_bytes(raw[0:4], "big")
    if len(raw) < 4 or found != magic:
        raise ArtifactError(f"{path}: bad idx magic {found}, expected {magic}; {_REINSTALL}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) < 4 + 4 * ndim:
        raise ArtifactError(f"{path}: truncated idx header; {_REINSTALL}")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ArtifactError(f"{path}: truncated, expected {int(np.prod(dims))} values, found {data.size}; "
                            f"{_REINSTALL}")
    return data.reshape(dims)


def load_split(directory: str | Path, split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (n, R, R, 1), each 28x28 digit-style image centred in an R x R black frame."""
    images_name, labels_name = FILES[split]
    directory = Path(directory)
    images = read_idx(directory / images_name, _IMAGE_MAGIC)  # (n, 28, 28)
    labels = read_idx(directory / labels_name, _LABEL_MAGIC).astype(np.int64)  # (n,)
    if len(images) != len(labels):
        raise ArtifactError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split}")
    if labels.size and labels.max() >= len(CLASS_NAMES):  # uint8 idx values: never negative
        first = int(np.argmax(labels >= len(CLASS_NAMES)))
        raise ArtifactError(f"{directory / labels_name}: label {labels[first]} at index {first} is not one of the "
                            f"{len(CLASS_NAMES)} classes (0..{len(CLASS_NAMES) - 1}); {_REINSTALL}")
    size = images.shape[1]
    if resolution < size:
        raise ValueError(f"data.resolution={resolution} is smaller than the {size}x{size} Fashion-MNIST images")
    top = (resolution - size) // 2
    framed = np.zeros((len(images), resolution, resolution, 1), dtype=np.uint8)
    framed[:, top:top + size, top:top + size, 0] = images
    return framed, labels
