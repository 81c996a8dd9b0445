"""Class-per-folder image trees, ImageNet ILSVRC-2012 included.

Layouts:
  ROOT/train/<class>/<files>      training images (class = folder name, e.g. a WordNet id)
  ROOT/val/<class>/<files>        validation as class folders, or
  ROOT/val/<files> + LOC_val_solution.csv (in ROOT or ROOT/val; columns ImageId,PredictionString
                                  whose first word is the class) — ILSVRC's flat validation set
  ROOT/<class>/<files>            any other class-per-folder tree (train only, no val split)

Every file is tried: images are converted to RGB (CMYK, grayscale, palette, alpha), center-cropped
ADM-style and resized; files that are not images, are truncated/corrupt, or are smaller than
``min_image_size`` are skipped and reported with their reason — never silently dropped.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from spectralar.io import ArtifactError


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_file() and _visible(p)), key=lambda p: p.name)


def scan(root: str | Path, max_per_class: Optional[int] = None) -> tuple[list[str], dict[str, list[Sample]]]:
    """Return (class names, {split: samples}) in a deterministic order (class, then file name)."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(
            f"image folder root {str(root)!r} does not exist: set the param `data.imagefolder_root` "
            f"to an ImageNet ILSVRC-2012 tree (train/<wnid>/*.JPEG) or any class-per-folder tree"
        )
    train_root = root / "train" if (root / "train").is_dir() else root
    classes = _class_dirs(train_root)
    if not classes:
        raise ArtifactError(f"{train_root}: no class folders found (expected {train_root}/<class>/<images>)")
    names = [c.name for c in classes]
    index = {name: k for k, name in enumerate(names)}
    splits: dict[str, list[Sample]] = {"train": []}
    for k, directory in enumerate(classes):
        files = _files(directory)
        if not files:
            raise ArtifactError(f"{directory}: empty class folder (class {directory.name!r} has no files)")
        splits["train"] += [Sample(str(f), k) for f in files[:max_per_class]]
    val_root = root / "val"
    if train_root != root and val_root.is_dir():
        splits["val"] = _scan_val(root, val_root, index, max_per_class)
    return names, splits


def _scan_val(root: Path, val_root: Path, index: dict[str, int], max_per_class: Optional[int]) -> list[Sample]:
    class_dirs = _class_dirs(val_root)
    samples: list[Sample] = []
    if class_dirs:
        for directory in class_dirs:
            if directory.name not in index:
                raise ArtifactError(f"{directory}: validation class {directory.name!r} is not a training class")
            files = _files(directory)
            if not files:
                raise ArtifactError(f"{directory}: empty class folder")
            samples += [Sample(str(f), index[directory.name]) for f in files[:max_per_class]]
        return samples
    csv_path = next((p for p in (root / "LOC_val_solution.csv", val_root / "LOC_val_solution.csv") if p.is_file()), None)
    if csv_path is None:
        raise FileNotFoundError(
            f"{val_root} holds flat files but no LOC_val_solution.csv was found in {root} or {val_root} "
            f"(ILSVRC-2012 ships it with the validation set; it maps ImageId to the class)"
        )
    labels: dict[str, str] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
    per_class: dict[int, int] = {}
    for path in _files(val_root):
        if path.name == "LOC_val_solution.csv":
            continue
        wnid = labels.get(path.stem)
        if wnid is None or wnid not in index:
            # kept so that prepare reports it as a skip with a reason rather than dropping it
            samples.append(Sample(str(path), -1))
            continue
        label = index[wnid]
        per_class[label] = per_class.get(label, 0) + 1
        if max_per_class is None or per_class[label] <= max_per_class:
            samples.append(Sample(str(path), label))
    return samples


def center_crop_arr(image, size: int) -> np.ndarray:
    """ADM's center crop: halve with a box filter while possible, bicubic-resize the short side to
    ``size``, then crop the center. Returns uint8 (size, size, 3)."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def load_image(path: str, label: int, size: int, min_size: int, fmt: str, quality: int):
    """Worker: (payload or None, label, skip reason or None). Never raises for bad files.

    One image too large to decode in memory is skipped like a corrupt one: a MemoryError left to
    propagate would end the whole ``prepare`` run (the pool re-raises it in the parent).
    """
    try:
        return _load_image(path, label, size, min_size, fmt, quality)
    except MemoryError:
        return None, label, "too large to decode in memory (MemoryError)"


def _load_image(path: str, label: int, size: int, min_size: int, fmt: str, quality: int):
    from PIL import Image, UnidentifiedImageError

    if label < 0:
        return None, label, "no class for this file in LOC_val_solution.csv"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency and EXIF chatter
            with Image.open(path) as image:
                image.load()  # force a full decode: truncated files fail here
                if min(image.size) < min_size:
                    return None, label, f"too small ({image.size[0]}x{image.size[1]} < {min_size})"
                if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
                    image = image.convert("RGBA")
                rgb = image.convert("RGB")
    except UnidentifiedImageError:
        return None, label, "not an image"
    except Image.DecompressionBombError as err:  # more than 2 x Image.MAX_IMAGE_PIXELS pixels
        return None, label, f"too large ({err})"
    except (OSError, ValueError, SyntaxError) as err:
        return None, label, f"corrupt image ({type(err).__name__}: {err})"
    array = center_crop_arr(rgb, size)
    if fmt == "raw":
        return array, label, None
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue(), label, None
