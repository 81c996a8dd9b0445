"""The Python API (``spectralar.api``) against a tiny pipeline's outputs, and the model cards the
training stages write beside their models.

The API must give what the pipeline gives: encoding reproduces dump_tokens' ids, decoding and
seeded sampling reproduce the sample stage's files. Comparisons use the stages' own batch sizes:
float results are bit-identical only for the same shapes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import spectralar
from spectralar.io import sha256_file
from spectralar.model_card import MODEL_CARD, render_model_card
from spectralar.models.sampling import cyclic_labels
from tests.conftest import REPO, TINY, make_fashion_dir
from tests.test_generator_stages import GeneratorProject

N_TOKENS, VOCAB = TINY["tokenizer.num_tokens"], TINY["tokenizer.codebook_size"]
STAGES = ("prepare", "train_proxy", "extract_proxy_codes", "train_tokenizer", "dump_tokens", "train_generator",
          "sample")


def build_pipeline(base: Path) -> GeneratorProject:
    """prepare -> ... -> sample on the TINY config under ``base/api_pipeline``, once per test session:
    tests/test_readme.py calls this too and reuses the outputs. Callers only read them."""
    root = base / "api_pipeline" / "p"
    done = root / "complete"
    if not done.exists():
        torch.set_num_threads(1)
        shutil.rmtree(root.parent, ignore_errors=True)
        root.mkdir(parents=True)
        project = GeneratorProject(root, make_fashion_dir(root.parent / "fashion"))
        for stage in STAGES:
            project.run(stage)
        done.touch()
    project = GeneratorProject.__new__(GeneratorProject)
    project.root, project.params = root, root / "params.yaml"
    return project


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> GeneratorProject:
    return build_pipeline(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def codec(pipeline) -> spectralar.Codec:
    return spectralar.load_codec(pipeline.root / "tokenizer")


@pytest.fixture(scope="module")
def generator(pipeline) -> spectralar.Generator:
    return spectralar.load_generator(pipeline.root / "generator")


def _stage_batch_sizes(project: GeneratorProject) -> tuple[int, int]:
    """(dump_tokens.batch_size, sample.batch_size) of the project's params."""
    from spectralar.config import load_params

    params = load_params(project.params)
    return params.dump_tokens.batch_size, params.sample.batch_size


# ------------------------------------------------------------------------------------------ the package

def test_import_is_light_and_the_api_loads_on_first_use():
    script = "import sys, spectralar; print('torch' in sys.modules, 'spectralar.api' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]  # a fresh `import spectralar` loads neither
    import spectralar.api

    exported = [name for name in spectralar.__all__ if name != "__version__"]
    assert exported and all(getattr(spectralar, name) is getattr(spectralar.api, name) for name in exported)
    assert set(exported) <= set(dir(spectralar))
    with pytest.raises(AttributeError, match="no attribute 'load_tokenizer'"):
        spectralar.load_tokenizer  # noqa: B018  (a typo is an AttributeError, not an import)


def test_loaders_take_the_folder_or_the_file_and_name_a_missing_one(pipeline, tmp_path):
    by_file = spectralar.load_codec(pipeline.root / "tokenizer" / "tokenizer.pt")
    assert (by_file.num_tokens, by_file.vocab_size, by_file.image_shape) == (N_TOKENS, VOCAB, (32, 32, 1))
    assert spectralar.load_generator(pipeline.root / "generator" / "generator.pt").num_tokens == N_TOKENS
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.pt not found.*dvc repro train_tokenizer"):
        spectralar.load_codec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"generator\.pt not found.*dvc repro train_generator"):
        spectralar.load_generator(tmp_path)


# ------------------------------------------------------------------------------------------ codec

def test_encode_gives_the_token_dump_ids_for_uint8_and_float_images(pipeline, codec):
    images, labels = spectralar.load_images(pipeline.root / "prepared", "val")
    dump_batch, _ = _stage_batch_sizes(pipeline)
    expected = np.load(pipeline.root / "tokens" / "val.npy").astype(np.int64)
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 1)
    assert np.array_equal(labels, np.load(pipeline.root / "tokens" / "val_labels.npy"))
    ids = codec.encode(images, batch_size=dump_batch)
    assert ids.dtype == torch.int64 and ids.shape == (20, N_TOKENS)
    assert np.array_equal(ids.numpy(), expected)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
    assert torch.equal(codec.encode(as_float, batch_size=dump_batch), ids)
    spread, _ = spectralar.load_images(pipeline.root / "prepared", "val", count=5)
    assert np.array_equal(spread, images[[0, 4, 8, 12, 16]])  # spread over the split, not its head


def test_decode_and_prefix_decode_give_the_sample_stage_images(pipeline, codec):
    """Truncation: decoding the first N-k ids is the stage's samples_drop{k}.npz."""
    _, sample_batch = _stage_batch_sizes(pipeline)
    samples = np.load(pipeline.root / "samples" / "samples.npz")
    dropped = np.load(pipeline.root / "samples" / "truncated" / "samples_drop2.npz")
    ids = samples["ids"]  # uint16 (S, N): numpy ids of any integer type are accepted
    assert np.array_equal(codec.decode(ids, batch_size=sample_batch), samples["arr_0"])
    assert np.array_equal(codec.decode(ids, num_tokens=N_TOKENS - 2, batch_size=sample_batch), dropped["arr_0"])
    assert np.array_equal(codec.decode(ids[:, :N_TOKENS - 2], batch_size=sample_batch), dropped["arr_0"])
    floats = codec.decode_float(torch.from_numpy(ids.astype(np.int64)), num_tokens=1)
    assert floats.shape == (len(ids), 1, 32, 32) and floats.dtype == torch.float32
    assert float(floats.min()) >= -1 and float(floats.max()) <= 1


# ------------------------------------------------------------------------------------------ generator

def test_seeded_generation_reproduces_the_sample_stage(pipeline, generator, codec):
    from spectralar.config import load_params

    cfg = load_params(pipeline.params).sample
    sampling = dict(cfg_scale=cfg.cfg_scale, cfg_schedule=cfg.cfg_schedule, temperature=cfg.temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p)
    samples = np.load(pipeline.root / "samples" / "samples.npz")
    labels = cyclic_labels(generator.num_classes, cfg.num_per_class)
    ids = spectralar.generate(generator, labels, seed=0, batch_size=cfg.batch_size, **sampling)  # run.seed 0
    assert ids.dtype == torch.int64 and np.array_equal(ids.numpy(), samples["ids"].astype(np.int64))
    assert np.array_equal(codec.decode(ids, batch_size=cfg.batch_size), samples["arr_0"])
    # truncated generation draws exactly the prefix of the full run (in one batch: see generate)
    whole = spectralar.generate(generator, labels, seed=0, batch_size=len(labels), **sampling)
    short = generator.sample(labels, num_tokens=N_TOKENS - 2, seed=0, batch_size=len(labels), **sampling)
    assert short.shape == (len(labels), N_TOKENS - 2) and torch.equal(short, whole[:, :N_TOKENS - 2])
    # spectrum completion keeps the given prefix
    completed = spectralar.generate(generator, labels[:4], prefix_ids=ids[:4, :3], seed=1, batch_size=3)
    assert torch.equal(completed[:, :3], ids[:4, :3])
    # another seed, other samples
    assert not torch.equal(spectralar.generate(generator, labels, seed=1, batch_size=cfg.batch_size, **sampling), ids)


def test_labels_are_class_indices_or_names(generator):
    assert generator.class_names[7] == "Sneaker"
    assert generator.labels(["Sneaker", 1, np.int64(3)]).tolist() == [7, 1, 3]
    assert generator.labels(np.array(["Bag", "Trouser"])).tolist() == [8, 1]
    assert generator.labels("Sneaker").tolist() == [7] and generator.labels(2).tolist() == [2]
    assert generator.labels(torch.tensor([0, 9])).tolist() == [0, 9]


def test_generator_checks_its_tokenizer(pipeline, generator, codec, tmp_path):
    from spectralar.training import load_checkpoint, save_checkpoint

    generator.check_codec(codec)  # the pair the pipeline trained
    state = load_checkpoint(pipeline.root / "tokenizer" / "tokenizer.pt")
    first = next(iter(state["weights"]["tokenizer"]))
    state["weights"]["tokenizer"][first] = state["weights"]["tokenizer"][first] + 1  # a retrained tokenizer
    save_checkpoint(tmp_path / "tokenizer.pt", state)
    with pytest.raises(ValueError, match="trained on the tokens of another tokenizer"):
        generator.check_codec(spectralar.load_codec(tmp_path))


# ------------------------------------------------------------------------------------------ checked inputs

BAD_IMAGES = {
    "numpy float": (np.zeros((2, 32, 32, 1), np.float32), "numpy images must be uint8"),
    "one image, no batch axis": (np.zeros((32, 32, 1), np.uint8), r"add a batch axis"),
    "channels first numpy": (np.zeros((2, 1, 32, 32), np.uint8), r"uint8 \(B, 32, 32, 1\).*got shape \(2, 1, 32, 32\)"),
    "another size": (np.zeros((2, 16, 16, 1), np.uint8), r"got shape \(2, 16, 16, 1\)"),
    "uint8 tensor": (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "tensor images must be float"),
    "0..255 floats": (torch.full((2, 1, 32, 32), 255.0), r"must lie in \[-1, 1\].*255"),
    "channels last tensor": (torch.zeros(2, 32, 32, 1), r"float \(B, 1, 32, 32\)"),
    "a list": ([[0]], "must be a uint8 numpy array"),
    "no images": (np.zeros((0, 32, 32, 1), np.uint8), "batch of 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_encode_refuses_images_it_cannot_take(codec, case):
    images, message = BAD_IMAGES[case]
    with pytest.raises((ValueError, TypeError), match=message):
        codec.encode(images)


BAD_IDS = {
    "float ids": (torch.zeros(2, N_TOKENS), {}, "ids must be integers"),
    "no batch axis": (torch.zeros(N_TOKENS, dtype=torch.long), {}, "add a batch axis"),
    "longer than N": (torch.zeros(2, N_TOKENS + 1, dtype=torch.long), {}, rf"1 <= n <= N = {N_TOKENS}"),
    "outside the codebook": (torch.full((2, N_TOKENS), VOCAB, dtype=torch.long), {}, rf"0\.\.{VOCAB - 1}"),
    "negative": (np.full((2, N_TOKENS), -1), {}, rf"0\.\.{VOCAB - 1}"),
    "no ids": (torch.zeros(0, N_TOKENS, dtype=torch.long), {}, "batch of 0"),
    "zero tokens kept": (torch.zeros(2, N_TOKENS, dtype=torch.long), {"num_tokens": 0}, "num_tokens must lie in"),
    "more tokens kept than given": (torch.zeros(2, 3, dtype=torch.long), {"num_tokens": 4}, r"1\.\.3"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_decode_refuses_ids_it_cannot_take(codec, case):
    ids, keywords, message = BAD_IDS[case]
    with pytest.raises(ValueError, match=message):
        codec.decode(ids, **keywords)


@pytest.mark.parametrize("labels, message", [
    (["Unicorn"], "unknown class 'Unicorn'"),
    ([10], r"labels must lie in 0\.\.9"),
    ([-1], r"labels must lie in 0\.\.9"),
    ([1.5], "class index or name"),
    (torch.tensor([[0, 1]]), "1-D batch"),
    (torch.tensor([0.0]), "class indices or names"),
])
def test_generate_refuses_labels_it_cannot_take(generator, labels, message):
    with pytest.raises(ValueError, match=message):
        spectralar.generate(generator, labels)


def test_save_png_writes_a_grid_and_refuses_floats(tmp_path, codec):
    from PIL import Image

    images = np.arange(6 * 32 * 32, dtype=np.int64).reshape(6, 32, 32, 1).astype(np.uint8)
    path = spectralar.save_png(tmp_path / "grid.png", images, columns=4)
    with Image.open(path) as picture:
        grid = np.asarray(picture)
    assert grid.shape == (64, 128)  # 2 rows of 4 columns, the last two cells empty
    assert np.array_equal(grid[32:, 32:64], images[5, :, :, 0]) and not grid[32:, 64:].any()
    with pytest.raises(ValueError, match="save_png takes uint8"):
        spectralar.save_png(tmp_path / "x.png", images.astype(np.float32))


# ------------------------------------------------------------------------------------------ model cards

def _card(folder: Path) -> str:
    return (folder / MODEL_CARD).read_text()


def _table(card: str) -> dict[str, str]:
    """The card's metrics table as {metric: cell}."""
    section = card.split("## Metrics at save time", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| (\S+) \| (.*) \|$", section, flags=re.M)[1:])  # [1:]: the header row


@pytest.mark.parametrize("stage, folder, model_file", [
    ("train_proxy", "proxy", "proxy.pt"),
    ("train_tokenizer", "tokenizer", "tokenizer.pt"),
    ("train_generator", "generator", "generator.pt"),
])
def test_a_model_card_describes_each_trained_model(pipeline, stage, folder, model_file):
    card = _card(pipeline.root / folder)
    model_path = pipeline.root / folder / model_file
    assert f"sha256 `{sha256_file(model_path)}`" in card and f"{model_path.stat().st_size} bytes" in card
    assert "images per split: train 60, val 20" in card  # the prepared data's split sizes
    # every result the stage reported is in the table, and no timing is
    metrics = json.loads((pipeline.root / f"{stage}.json").read_text())
    table = _table(card)
    assert set(table) == set(metrics)
    for key, value in metrics.items():
        assert table[key] == (", ".join(map(str, value)) if isinstance(value, list) else str(value)), key
    timings = json.loads((pipeline.root / f"{stage}.timing.json").read_text())
    assert timings and not set(timings) & set(table)
    # the params block is the sections the stage read
    block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(block) == json.loads((pipeline.root / folder / "config.json").read_text())["params"]
    assert not re.search(r"\b[0-9a-f]{40}\b", card)  # no commit
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", card)  # no date


def test_the_data_section_names_the_source_or_the_token_dump(pipeline):
    assert "source: `fashion_mnist`, prepared at 32x32, 1 channel(s), 10 classes" in _card(pipeline.root / "proxy")
    tokenizer_sha = sha256_file(pipeline.root / "tokenizer" / "tokenizer.pt")
    generator_card = _card(pipeline.root / "generator")
    assert f"{N_TOKENS} ids per image, vocabulary {VOCAB}" in generator_card
    assert f"tokenizer: sha256 `{tokenizer_sha}`" in generator_card


def test_a_rerun_writes_the_same_card_whatever_the_timings(pipeline, tmp_path):
    """dvc.lock pins the model folder: the card must not change when the same model is retrained
    (elsewhere, with other timings)."""
    root = tmp_path / "p"
    root.mkdir()
    (tmp_path / "fashion").symlink_to(pipeline.root.parent / "fashion")
    shutil.copytree(pipeline.root / "tokens", root / "tokens")
    project = GeneratorProject.__new__(GeneratorProject)
    project.root = root
    project.set_params({})
    torch.set_num_threads(1)
    project.run("train_generator")
    assert (root / "generator" / MODEL_CARD).read_bytes() == (pipeline.root / "generator" / MODEL_CARD).read_bytes()
    # rendering directly: telemetry keys never reach the card
    config = json.loads((root / "generator" / "config.json").read_text())
    manifest = json.loads((root / "tokens" / "manifest.json").read_text())
    metrics = json.loads((pipeline.root / "train_generator.json").read_text())
    base = render_model_card(config, "generator.pt", "0" * 64, 1, manifest, metrics)
    slower = render_model_card(config, "generator.pt", "0" * 64, 1, manifest,
                               {**metrics, "train_seconds": 99.0, "tokens_per_second": 1.0, "mfu": 0.5})
    assert slower == base
