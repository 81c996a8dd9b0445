"""Damaged or hostile inputs stop with one line that names the file and what to do, and never reach
code execution or paths outside their roots: weights files, prepared shards, manifests, token dumps,
sample and reference archives, sweep rows, the image-folder root and single huge images."""

from __future__ import annotations

import argparse
import gzip
import json
import re
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from spectralar import sweep
from spectralar.artifacts import load_proxy_codes, load_samples, load_tokens, write_tokens
from spectralar.cli import main, run_stage
from spectralar.config import ConfigError, load_params
from spectralar.data import fashion_mnist
from spectralar.data.shards import ImageShards
from spectralar.evaluation.extractors import INCEPTION_WEIGHTS_FILE, extractor_for, resolve_inception
from spectralar.evaluation.metrics import load_reference, save_reference
from spectralar.io import ArtifactError, read_json, read_manifest, write_json, write_manifest
from tests.conftest import make_fashion_dir, write_params


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A tiny prepared Fashion-MNIST folder (train: 3 shards of 10 images)."""
    fashion = make_fashion_dir(tmp_path / "fashion", n_train=30, n_val=10)
    params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(fashion), "data.shard_size": 10})
    out = tmp_path / "prepared"
    run_stage("prepare", argparse.Namespace(params=str(params), metrics=str(tmp_path / "prepare.json"), out=str(out)))
    return out


# --------------------------------------------------------------------------------------------
# 1. A weights file never runs code
# --------------------------------------------------------------------------------------------

def _plant(marker: str) -> None:
    Path(marker).write_text("code ran")


class _Payload:
    """Unpickling this calls _plant: what a hostile 'weights' file would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _plant, (self.marker,)


def test_a_pickled_payload_in_the_inception_weights_is_refused_unrun(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "marker"
    evil = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"fc.bias": _Payload(marker)}, evil)
    for choose in (lambda: resolve_inception(str(evil)), lambda: extractor_for("inception", str(evil), "none")):
        with pytest.raises(ArtifactError, match="not a file of plain tensors") as error:
            choose()
        assert str(evil) in str(error.value) and "_plant" in str(error.value) and "\n" not in str(error.value)
    # the torch hub cache, where torch-fidelity itself would look
    hub = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    hub.write_bytes(evil.read_bytes())
    with pytest.raises(ArtifactError, match="not a file of plain tensors") as error:
        resolve_inception(None)
    assert str(hub) in str(error.value)
    assert not marker.exists()
    # the payload is live: torch-fidelity's own torch.load(weights_only=False) would have run it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save([torch.zeros(1)], weights)
    with pytest.raises(ArtifactError, match="holds a list, not a state dict"):
        resolve_inception(str(weights))


# --------------------------------------------------------------------------------------------
# 2. Paths stay inside their roots
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["../../../../outside/train/evil", "/tmp/outside/evil", ""])
def test_a_manifest_stem_outside_the_dataset_is_refused(prepared, stem):
    manifest_path = prepared / "manifest.json"
    manifest = read_manifest(manifest_path)  # an edit that keeps the manifest's own digest right
    manifest["splits"]["train"]["shards"][1]["stem"] = stem
    write_manifest(manifest_path, manifest)
    with pytest.raises(ArtifactError, match="is not a path inside") as error:
        ImageShards(prepared, "train")
    assert str(manifest_path) in str(error.value) and repr(stem) in str(error.value)


def test_a_sweep_row_name_cannot_leave_the_project(tmp_path, monkeypatch, capsys):
    params = write_params(tmp_path / "params.yaml", {"sweeps.evil": {"../../../escaped": {"generator.depth": 2}}})
    project = tmp_path / "a" / "b" / "project"
    project.mkdir(parents=True)
    monkeypatch.chdir(project)
    assert sweep.main(["--params", str(params), "params", "evil", "../../../escaped"]) == 2
    assert "sweeps.evil.../../../escaped: name '../../../escaped' may only hold" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped*")) and not (project / "runs").exists()
    with pytest.raises(ConfigError, match=r"^sweeps\.a/b: name 'a/b' may only hold letters, digits"):
        sweep.sweep_rows({"sweeps": {"a/b": {"row": {}}}}, "a/b")
    assert list(sweep.sweep_rows({"sweeps": {"depth-2_x": {"Row_1-b": {}}}}, "depth-2_x")) == ["Row_1-b"]


def test_an_empty_imagefolder_root_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"data.source": "imagefolder", "data.imagefolder_root": ""})
    with pytest.raises(ConfigError, match=r"^data\.imagefolder_root: imagefolder_root is empty .*data\.imagefolder_root"):
        load_params(params)


# --------------------------------------------------------------------------------------------
# 3. Damaged files: one line naming the file and what to rerun
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "short"])
def test_damaged_fashion_mnist_files_name_the_file(tmp_path, damage):
    directory = make_fashion_dir(tmp_path / "fashion", n_train=10, n_val=10)
    path = directory / "train-images-idx3-ubyte.gz"
    if damage == "truncated":
        _truncate(path)
    elif damage == "not_gzip":
        path.write_bytes(b"<html>404</html>")
    else:  # a gzip that holds only part of the header
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00"))
    with pytest.raises(ArtifactError) as error:
        fashion_mnist.load_split(directory, "train", 32)
    assert str(error.value).startswith(f"{path}: ") and "apt-get install --reinstall dataset-fashion-mnist" in str(
        error.value)


def test_the_cli_prints_one_line_and_exits_2_for_a_damaged_input(tmp_path, monkeypatch, capsys):
    directory = make_fashion_dir(tmp_path / "fashion", n_train=10, n_val=10)
    _truncate(directory / "t10k-labels-idx1-ubyte.gz")
    params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(directory)})
    monkeypatch.chdir(tmp_path)
    code = main(["prepare", "--params", str(params), "--metrics", "prepare.json", "--out", "prepared"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if " ERROR " in line]
    assert f"{directory / 't10k-labels-idx1-ubyte.gz'}: not a complete gzip file (EOFError" in line


def test_a_truncated_shard_names_the_file_and_the_stage(prepared):
    _truncate(prepared / "train" / "shard-00001.npy")
    shards = ImageShards(prepared, "train")
    assert shards.images([0]).shape == (1, 32, 32, 1)  # other shards still read
    with pytest.raises(ArtifactError, match="mmap length is greater than file size") as error:
        shards.images([15])
    assert str(error.value).startswith(f"{prepared / 'train' / 'shard-00001.npy'}: truncated or not an .npy array")
    assert f"rerun prepare: `dvc repro -f -s prepare` or `snakemake -f {prepared}`" in str(error.value)


def test_truncated_labels_and_manifest_name_the_file(prepared):
    _truncate(prepared / "val" / "shard-00000.labels.npy", 0.9)
    with pytest.raises(ArtifactError, match=r"val/shard-00000\.labels\.npy: truncated or not an .npy array"):
        ImageShards(prepared, "val")
    _truncate(prepared / "manifest.json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON \(.*\); rerun prepare"):
        ImageShards(prepared, "train")


def test_a_shard_of_another_run_is_refused(prepared):
    np.save(prepared / "train" / "shard-00002.npy", np.zeros((4, 32, 32, 1), np.uint8))
    with pytest.raises(ArtifactError, match=r"shard-00002\.npy: shape \(4, 32, 32, 1\), but .* says \(10, 32, 32, 1\)"):
        ImageShards(prepared, "train").load_all()


def test_truncated_token_dump_and_proxy_table_name_the_file(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    write_json(tokens / "manifest.json", {"vocab": 8})
    write_tokens(tokens, "train", np.zeros((50, 4), np.uint16), np.zeros(50, np.int64))
    _truncate(tokens / "train.npy")
    with pytest.raises(ArtifactError, match="rerun dump_tokens") as error:
        load_tokens(tokens)
    assert str(error.value).startswith(f"{tokens / 'train.npy'}: truncated or not an .npy array")

    codes = tmp_path / "proxy_codes"
    codes.mkdir()
    write_json(codes / "manifest.json", {"mode": "precomputed"})
    np.save(codes / "train.npy", np.zeros((20, 4, 16), np.uint16))
    _truncate(codes / "train.npy")
    with pytest.raises(ArtifactError, match="mmap length is greater than file size.*rerun extract_proxy_codes"):
        load_proxy_codes(codes)


def _flip_byte(path: Path, offset: int = -1) -> None:
    """Flip the lowest bit of one byte (by default the last: array data, past the .npy header)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture
def full_verify(monkeypatch):
    monkeypatch.setenv("SPECTRALAR_VERIFY", "full")


def test_a_flipped_byte_in_a_shard_names_the_file_and_the_stage(prepared, full_verify, monkeypatch):
    shard = prepared / "train" / "shard-00001.npy"
    _flip_byte(shard)
    shards = ImageShards(prepared, "train")
    assert shards.images([0]).shape == (1, 32, 32, 1)  # other shards still read
    with pytest.raises(ArtifactError) as error:
        shards.images([15])
    message = str(error.value)
    assert message.startswith(f"{shard}: content (with {prepared / 'train' / 'shard-00001.labels.npy'}) does not "
                              f"match its sha256 in {prepared / 'manifest.json'}")
    assert message.endswith(f"rerun prepare: `dvc repro -f -s prepare` or `snakemake -f {prepared}`")
    monkeypatch.setenv("SPECTRALAR_VERIFY", "fast")  # the cheap checks only: the damage goes unseen
    assert ImageShards(prepared, "train").images([15]).shape == (1, 32, 32, 1)


def test_a_flipped_label_is_caught_by_the_shard_checksum(prepared, full_verify):
    labels = prepared / "val" / "shard-00000.labels.npy"
    _flip_byte(labels, -2)  # the low byte of the last int16 label: 9 -> 8, still a class
    with pytest.raises(ArtifactError, match=r"shard-00000\.npy: content \(with .*shard-00000\.labels\.npy\) does not"):
        ImageShards(prepared, "val").load_all()


def test_a_label_outside_the_classes_is_refused_on_open_in_any_mode(prepared, monkeypatch):
    monkeypatch.setenv("SPECTRALAR_VERIFY", "fast")
    path = prepared / "val" / "shard-00000.labels.npy"
    np.save(path, np.full(10, 12, np.int16))
    with pytest.raises(ArtifactError) as error:
        ImageShards(prepared, "val")
    assert str(error.value).startswith(f"{path}: labels 12..12, but {prepared / 'manifest.json'} has 10 classes (0..9)")
    assert "rerun prepare" in str(error.value)


def test_a_shard_of_another_dtype_is_refused(prepared):
    np.save(prepared / "train" / "shard-00002.npy", np.zeros((10, 32, 32, 1), np.float32))
    with pytest.raises(ArtifactError, match=r"shard-00002\.npy: dtype float32, but .* says uint8; rerun prepare"):
        ImageShards(prepared, "train").load_all()


def test_an_edited_shard_checksum_in_the_manifest_is_refused(prepared):
    manifest_path = prepared / "manifest.json"
    manifest = read_manifest(manifest_path)  # edited with its own digest renewed: the split's checksum catches it
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    write_manifest(manifest_path, manifest)
    with pytest.raises(ArtifactError, match=r"manifest\.json: the train split's sha256 does not match its shards'"):
        ImageShards(prepared, "train")


def _json_flips(text: str) -> dict[str, str]:
    """One-bit flips of a manifest that still parse as JSON and change a value: a digit of a count,
    a letter of a class name, a hex digit of a recorded checksum."""
    flips = {}
    for name, pattern in (("a count", r'"count": (\d)'), ("a class name", r'"(T)-shirt'),
                          ("a recorded sha256", r'"sha256": "([0-9a-f])')):
        match = re.search(pattern, text)
        assert match, (name, pattern)
        i = match.start(1)
        flipped = text[:i] + chr(ord(text[i]) ^ 1) + text[i + 1:]
        json.loads(flipped)
        flips[name] = flipped
    return flips


def test_a_byte_flip_that_still_parses_in_a_manifest_is_refused(prepared):
    manifest_path = prepared / "manifest.json"
    text = manifest_path.read_text()
    assert '"content_sha256"' in text
    for name, flipped in _json_flips(text).items():
        manifest_path.write_text(flipped)
        with pytest.raises(ArtifactError, match=r"manifest\.json: does not match its own sha256 .*rerun prepare") as error:
            ImageShards(prepared, "train")
        assert str(manifest_path) in str(error.value), name
    manifest_path.write_text(text)
    assert len(ImageShards(prepared, "train")) == 30


def test_fashion_mnist_labels_outside_the_classes_are_refused_at_prepare(tmp_path):
    directory = make_fashion_dir(tmp_path / "fashion", n_train=10, n_val=10)
    path = directory / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8 + 3] = 10  # the 4th label: one past Ankle boot
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ArtifactError) as error:
        fashion_mnist.load_split(directory, "train", 32)
    assert str(error.value).startswith(f"{path}: label 10 at index 3 is not one of the 10 classes (0..9); reinstall")


def _token_dump(directory: Path) -> Path:
    directory.mkdir()
    files = {**write_tokens(directory, "train", np.arange(200, dtype=np.uint16).reshape(50, 4), np.arange(50) % 10),
             **write_tokens(directory, "val", np.zeros((10, 4), np.uint16), np.zeros(10, np.int64))}
    write_json(directory / "manifest.json", {"vocab": 256, "files": files})
    return directory


def test_a_flipped_byte_in_a_token_file_names_the_file_and_the_stage(tmp_path, full_verify):
    tokens = _token_dump(tmp_path / "tokens")
    manifest, ids, labels = load_tokens(tokens)
    assert ids.shape == (50, 4) and labels.dtype == np.int64 and manifest["files"]["train.npy"]["dtype"] == "uint16"
    for name in ("train.npy", "labels.npy"):
        _flip_byte(tokens / name)
        with pytest.raises(ArtifactError) as error:
            load_tokens(tokens)
        assert str(error.value) == (f"{tokens / name}: content does not match the sha256 in {tokens / 'manifest.json'} "
                                    f"(a damaged or replaced file); rerun dump_tokens: `dvc repro -f -s dump_tokens` "
                                    f"or `snakemake -f {tokens}`")
        _flip_byte(tokens / name)  # repaired
    assert load_tokens(tokens, "val")[1].shape == (10, 4)


def test_a_token_file_of_another_shape_or_an_old_manifest_is_refused(tmp_path):
    tokens = _token_dump(tmp_path / "tokens")
    np.save(tokens / "val.npy", np.zeros((10, 8), np.uint16))
    with pytest.raises(ArtifactError, match=r"val\.npy: shape \[10, 8\], but .*manifest\.json says \[10, 4\]; rerun dump"):
        load_tokens(tokens, "val")
    write_json(tokens / "manifest.json", {"vocab": 256})  # written before manifests carried checksums
    with pytest.raises(ArtifactError, match=r"train\.npy: .*manifest\.json lists no shape or checksum for it"):
        load_tokens(tokens)


def test_a_flipped_byte_in_the_proxy_code_table_names_the_file_and_the_stage(tmp_path, full_verify):
    from spectralar.io import array_record

    codes = tmp_path / "proxy_codes"
    codes.mkdir()
    table = np.random.default_rng(0).integers(0, 256, (20, 4, 16)).astype(np.uint16)
    np.save(codes / "train.npy", table)
    write_json(codes / "manifest.json", {"mode": "precomputed", "files": {"train.npy": array_record(codes / "train.npy", table)}})
    assert np.array_equal(load_proxy_codes(codes)[1], table)
    _flip_byte(codes / "train.npy", -7)
    with pytest.raises(ArtifactError) as error:
        load_proxy_codes(codes)
    assert str(error.value).startswith(f"{codes / 'train.npy'}: content does not match the sha256 in "
                                       f"{codes / 'manifest.json'}")
    assert str(error.value).endswith(f"rerun extract_proxy_codes: `dvc repro -f -s extract_proxy_codes` or "
                                     f"`snakemake -f {codes}`")


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_sample_and_reference_archives_name_the_file(tmp_path, keep):
    samples = tmp_path / "samples" / "samples.npz"
    samples.parent.mkdir()
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(4, np.int64))
    _truncate(samples, keep)
    with pytest.raises(ArtifactError, match=r"samples\.npz: truncated or not an \.npz archive") as error:
        load_samples(samples, (8, 8, 1), 10)
    assert f"rerun sample: `dvc repro -f -s sample` or `snakemake -f {samples.parent}`" in str(error.value)

    reference = tmp_path / "reference" / "inception.npz"
    reference.parent.mkdir()
    save_reference(reference, {"mu": np.zeros(3), "sigma": np.eye(3), "features": None})
    _truncate(reference, keep)
    with pytest.raises(ArtifactError, match=r"inception\.npz: truncated or not an \.npz archive.*rerun reference_st"):
        load_reference(reference)


def test_invalid_metrics_json_names_the_file(tmp_path):
    metrics = tmp_path / "evaluate.json"
    metrics.write_text('{"fid": 1.')
    with pytest.raises(ArtifactError, match=r"evaluate\.json: not valid JSON \(Expecting"):
        read_json(metrics)


# --------------------------------------------------------------------------------------------
# One bad image is skipped, never the end of prepare
# --------------------------------------------------------------------------------------------

def _save(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_an_image_too_large_to_decode_is_skipped_and_listed(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    for name in ("a", "b"):
        _save(root / "train" / name / "ok.png", 16)
    _save(root / "train" / "a" / "bomb.png", 100)  # 10,000 px > 2 x MAX_IMAGE_PIXELS: DecompressionBombError
    _save(root / "train" / "b" / "huge.png", 16)  # decoding it runs out of memory (simulated)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    load = ImageFile.ImageFile.load

    def load_or_run_out_of_memory(self):
        if Path(self.filename).name == "huge.png":
            raise MemoryError
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_or_run_out_of_memory)  # forked workers inherit it
    params = write_params(tmp_path / "params.yaml", {"data.source": "imagefolder", "data.imagefolder_root": str(root),
                                                     "data.resolution": 8, "data.workers": 2})
    out = tmp_path / "prepared"
    args = argparse.Namespace(params=str(params), metrics=str(tmp_path / "m.json"), out=str(out))
    metrics = run_stage("prepare", args)
    assert metrics["images"] == {"train": 2, "val": 0} and metrics["skipped"] == 2
    reasons = {item["path"]: item["reason"] for item in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert reasons["train/b/huge.png"] == "too large to decode in memory (MemoryError)"
    assert reasons["train/a/bomb.png"].startswith("too large (Image size (10000 pixels) exceeds limit")


def test_a_class_with_only_skipped_files_names_them(tmp_path):
    root = tmp_path / "tree"
    _save(root / "train" / "a" / "ok.png", 16)
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    params = write_params(tmp_path / "params.yaml", {"data.source": "imagefolder", "data.imagefolder_root": str(root),
                                                     "data.resolution": 8})
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("spectralar").addHandler(handler)
    try:
        with pytest.raises(ValueError, match=r"^class 'b' has no readable training image: all 1 of its files were "
                                             r"skipped \(train/b/notes\.txt: not an image\)$"):
            run_stage("prepare", argparse.Namespace(params=str(params), metrics=str(tmp_path / "m.json"),
                                                    out=str(tmp_path / "prepared")))
    finally:
        logging.getLogger("spectralar").removeHandler(handler)
    assert "skipped train/train/b/notes.txt: not an image" in logged
