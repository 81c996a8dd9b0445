from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spectralar.cli import run_stage
from spectralar.data.imagefolder import center_crop_arr
from spectralar.data.shards import ImageShards
from tests.conftest import write_params


def _run_prepare(tmp_path: Path, overrides: dict, out: str = "prepared") -> tuple[dict, Path]:
    params = write_params(tmp_path / "params.yaml", overrides)
    args = argparse.Namespace(params=str(params), metrics=str(tmp_path / f"{out}.json"), out=str(tmp_path / out))
    return run_stage("prepare", args), tmp_path / out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_imagefolder(root: Path, flat_val: bool = True) -> Path:
    """Two ILSVRC-style classes with every kind of awkward file the real set has."""
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (root / "train" / wnid).mkdir(parents=True)
    a, b = root / "train" / "n01440764", root / "train" / "n01443537"
    (a / "good_rgb.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)))
    (a / "cmyk.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8), "CMYK"))
    Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8)).save(a / "gray.png")
    palette = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0
    palette.save(a / "palette.png", transparency=0)
    good = _jpeg(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
    (b / "big.JPEG").write_bytes(good)
    (b / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (b / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(b / "tiny.png")
    val = root / "val"
    val.mkdir()
    if flat_val:
        (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
        (val / "ILSVRC2012_val_00000002.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
        (val / "ILSVRC2012_val_00000003.JPEG").write_bytes(b"\xff\xd8 broken")
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n"
            "ILSVRC2012_val_00000001,n01443537 1 2 3 4\n"
            "ILSVRC2012_val_00000002,n01440764 1 2 3 4 n01440764 5 6 7 8\n"
            "ILSVRC2012_val_00000003,n01440764 1 2 3 4\n"
        )
    return root


# ---------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_frames_and_manifest(tmp_path, fashion_dir):
    metrics, out = _run_prepare(tmp_path, {"data.fashion_mnist_dir": str(fashion_dir), "data.shard_size": 25})
    assert metrics["images"] == {"train": 60, "val": 20}
    train = ImageShards(out, "train")
    images = train.load_all()
    assert images.shape == (60, 32, 32, 1) and images.dtype == np.uint8
    assert len(train.shards) == 3  # 25 + 25 + 10
    assert images[:, :2].max() == 0 and images[:, -2:].max() == 0  # 2-pixel black frame
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["per_class"]["Trouser"] == 6
    assert (out / "config.json").is_file()
    # random access agrees with sequential access
    assert np.array_equal(train.images([7, 3]), images[[7, 3]])
    assert train.labels.tolist() == [i % 10 for i in range(60)]


def test_evaluation_subsets_spread_over_a_class_sorted_split(tmp_path, fashion_dir):
    _, out = _run_prepare(tmp_path, {"data.fashion_mnist_dir": str(fashion_dir)})
    train = ImageShards(out, "train")
    assert train.spread(100).tolist() == list(range(60))  # more than there are: all of them
    index = train.spread(20)
    assert len(index) == 20 and len(set(index.tolist())) == 20 and index.max() < 60
    # on a class-sorted split (ImageFolder layout) the first 20 hold 4 classes; the spread holds all
    sorted_labels = np.sort(train.labels)
    assert len(set(sorted_labels[:20].tolist())) == 4 and len(set(sorted_labels[index].tolist())) == 10


def test_fashion_mnist_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*data.fashion_mnist_dir"):
        _run_prepare(tmp_path, {"data.fashion_mnist_dir": str(tmp_path / "nowhere")})


def test_fashion_mnist_rerun_is_byte_identical(tmp_path, fashion_dir):
    overrides = {"data.fashion_mnist_dir": str(fashion_dir)}
    _, first = _run_prepare(tmp_path, overrides, "a")
    _, second = _run_prepare(tmp_path, overrides, "b")
    a, b = _tree_bytes(first), _tree_bytes(second)
    a.pop("config.json"), b.pop("config.json")  # holds nothing path-dependent but the params path
    assert a == b


# ---------------------------------------------------------------- image folders


def test_imagefolder_converts_or_skips_every_bad_file(tmp_path):
    root = make_imagefolder(tmp_path / "ilsvrc")
    overrides = {"data.source": "imagefolder", "data.imagefolder_root": str(root), "data.resolution": 16}
    metrics, out = _run_prepare(tmp_path, overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {
        "train/n01443537/truncated.JPEG", "train/n01443537/notes.txt", "train/n01443537/tiny.png",
        "val/ILSVRC2012_val_00000003.JPEG",
    }
    assert reasons["train/n01443537/notes.txt"] == "not an image"
    assert reasons["train/n01443537/tiny.png"].startswith("too small")
    assert reasons["train/n01443537/truncated.JPEG"].startswith("corrupt image")
    assert metrics["images"] == {"train": 5, "val": 2} and metrics["skipped"] == 4
    train = ImageShards(out, "train")
    assert train.load_all().shape == (5, 16, 16, 3)
    assert train.labels.tolist() == [0, 0, 0, 0, 1]  # cmyk, good_rgb, gray, palette | big
    assert ImageShards(out, "val").labels.tolist() == [1, 0]
    assert manifest["class_names"] == ["n01440764", "n01443537"]


def test_imagefolder_jpeg_shards_and_determinism(tmp_path):
    root = make_imagefolder(tmp_path / "ilsvrc")
    base = {"data.source": "imagefolder", "data.imagefolder_root": str(root), "data.resolution": 16}
    _, raw = _run_prepare(tmp_path, base, "raw")
    jpeg_opts = {**base, "data.shard_format": "jpeg", "data.jpeg_quality": 100, "data.workers": 2}
    _, first = _run_prepare(tmp_path, jpeg_opts, "jpeg_a")
    _, second = _run_prepare(tmp_path, {**jpeg_opts, "data.workers": 1}, "jpeg_b")
    a, b = _tree_bytes(first), _tree_bytes(second)
    a.pop("config.json"), b.pop("config.json")
    assert a == b  # worker count does not change a byte
    decoded = ImageShards(first, "train").load_all().astype(int)
    exact = ImageShards(raw, "train").load_all().astype(int)
    assert np.abs(decoded - exact).mean() < 3.0  # JPEG at q100 is near-lossless


def test_imagefolder_class_folder_val(tmp_path):
    root = make_imagefolder(tmp_path / "tree", flat_val=False)
    (root / "val" / "n01443537").mkdir()
    Image.fromarray(np.full((20, 20, 3), 9, dtype=np.uint8)).save(root / "val" / "n01443537" / "x.png")
    metrics, _ = _run_prepare(tmp_path, {"data.source": "imagefolder", "data.imagefolder_root": str(root)})
    assert metrics["images"]["val"] == 1


@pytest.mark.parametrize("case", ["missing_root", "empty_class", "no_classes", "all_bad", "flat_val_no_csv"])
def test_imagefolder_errors(tmp_path, case):
    root = tmp_path / "root"
    if case == "empty_class":
        make_imagefolder(root)
        (root / "train" / "n09999999").mkdir()
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
    elif case == "all_bad":
        (root / "train" / "c").mkdir(parents=True)
        (root / "train" / "c" / "a.txt").write_text("x")
    elif case == "flat_val_no_csv":
        make_imagefolder(root)
        (root / "LOC_val_solution.csv").unlink()
    expected = {
        "missing_root": (FileNotFoundError, "data.imagefolder_root"),
        "empty_class": (ValueError, "empty class folder"),
        "no_classes": (ValueError, "no class folders"),
        "all_bad": (ValueError, "no readable training image"),
        "flat_val_no_csv": (FileNotFoundError, "LOC_val_solution.csv"),
    }[case]
    with pytest.raises(expected[0], match=expected[1]):
        _run_prepare(tmp_path, {"data.source": "imagefolder", "data.imagefolder_root": str(root)})
    assert not (tmp_path / "prepared").exists()  # nothing that looks complete


def test_center_crop_matches_adm_arithmetic():
    # 300x200 (w x h) at size 16: halve while min side >= 32 -> 150x100 -> 75x50 -> 37x25 (min 25 < 32 stop)
    # then scale 16/25: round(37*0.64)=24 x 16 -> crop the centre 16x16
    image = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8), (200, 1)))
    out = center_crop_arr(image.convert("RGB"), 16)
    assert out.shape == (16, 16, 3)
    # the horizontal ramp survives: left-to-right increasing around the centre of the image
    assert out[8, 0, 0] < out[8, 15, 0]
    assert abs(int(out[8, 8, 0]) - 150) < 12


def test_jpeg_shards_are_checked_against_their_manifest(tmp_path, monkeypatch):
    """A flipped byte in a JPEG shard or its offsets names the file and the stage to rerun."""
    from spectralar.io import ArtifactError

    monkeypatch.setenv("SPECTRALAR_VERIFY", "full")
    root = make_imagefolder(tmp_path / "tree")
    _, out = _run_prepare(tmp_path, {"data.source": "imagefolder", "data.imagefolder_root": str(root),
                                     "data.resolution": 16, "data.shard_format": "jpeg", "data.workers": 1})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtypes"] == {"images": "uint8", "labels": "int16", "offsets": "int64"}
    assert len(manifest["splits"]["train"]["shards"][0]["offsets_sha256"]) == 64
    reference = ImageShards(out, "train").load_all()
    for name, offset in (("shard-00000.bin", 200), ("shard-00000.offsets.npy", -16)):  # an inner offset
        path = out / "train" / name
        data = bytearray(path.read_bytes())
        data[offset] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactError) as error:
            ImageShards(out, "train").load_all()
        assert str(error.value).startswith(f"{path}: ") and "rerun prepare: `dvc repro -f -s prepare`" in str(error.value)
        data[offset] ^= 1
        path.write_bytes(bytes(data))
    assert np.array_equal(ImageShards(out, "train").load_all(), reference)
