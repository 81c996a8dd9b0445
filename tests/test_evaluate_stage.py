"""evaluate on a tiny pipeline: known answers, bad sample files, the truncation table, the stage end to end."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spectralar.data.loader import to_float, to_uint8
from spectralar.data.shards import ImageShards
from spectralar.evaluation.domain import load_domain_net, predict
from spectralar.artifacts import load_codec
from spectralar.artifacts import load_samples, truncated_files
from tests.conftest import TINY, make_fashion_dir
from tests.test_generator_stages import GeneratorProject

N_TOKENS = TINY["tokenizer.num_tokens"]
NUM_REFERENCE = TINY["reference_stats.num_images"]
# An evalnet that actually separates the synthetic classes (TINY's one epoch predicts a single class,
# which would make every class accuracy 0.1 whatever the labels).
EVALNET = {"train_evalnet.epochs": 15, "train_evalnet.width": 8}


class EvaluateProject(GeneratorProject):
    """The generator Project plus train_evalnet, reference_stats and evaluate."""

    def argv(self, stage: str) -> list[str]:
        r = self.root
        paths = {
            "train_evalnet": ["--data", r / "prepared", "--out", r / "evalnet"],
            "reference_stats": ["--data", r / "prepared", "--evalnet", r / "evalnet/evalnet.pt", "--out",
                                r / "reference"],
            "evaluate": ["--samples", r / "samples", "--reference", r / "reference", "--evalnet",
                         r / "evalnet/evalnet.pt", "--tokenizer", r / "tokenizer/tokenizer.pt", "--data",
                         r / "prepared", "--out", r / "evaluate"],
        }.get(stage)
        if paths is None:
            return super().argv(stage)
        return [stage, "--params", str(self.params), "--metrics", str(r / f"{stage}.json"), *map(str, paths)]

    def set_params(self, overrides: dict) -> None:
        super().set_params({**EVALNET, **overrides})

    def evaluate(self, samples: Path, name: str) -> dict:
        """The evaluate stage on another samples directory, writing to <root>/<name>[.json]."""
        from spectralar.cli import build_parser, run_stage

        argv = self.argv("evaluate")
        for flag, value in (("--samples", samples), ("--out", self.root / name),
                            ("--metrics", self.root / f"{name}.json")):
            argv[argv.index(flag) + 1] = str(value)
        return run_stage("evaluate", build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> EvaluateProject:
    """prepare -> ... -> sample, train_evalnet, reference_stats on the TINY config, once per module."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("evaluate_stage")
    fashion = make_fashion_dir(base / "fashion")
    (base / "p").mkdir()
    project = EvaluateProject(base / "p", fashion, EVALNET)
    project.run_all()
    for stage in ("dump_tokens", "train_generator", "sample", "train_evalnet", "reference_stats"):
        project.run(stage)
    return project


def _val(project: EvaluateProject, count: int = NUM_REFERENCE) -> tuple[np.ndarray, np.ndarray]:
    """The val images the stages evaluate on: ``count`` spread evenly over the split."""
    shards = ImageShards(project.root / "prepared", "val")
    index = shards.spread(count)
    return shards.images(index), shards.labels[index]


def _write_samples(directory: Path, images: np.ndarray, labels: np.ndarray, name: str = "samples.npz") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / name, arr_0=images, labels=labels)
    return directory / name


def _rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ known answers

def test_reference_images_as_samples_score_fid_zero_and_the_evalnet_accuracy(pipeline, tmp_path):
    images, labels = _val(pipeline)  # exactly the images behind data/reference/domain.npz
    _write_samples(tmp_path / "same", images, labels)
    same = pipeline.evaluate(tmp_path / "same", "same")
    assert abs(same["fid"]) < 1e-3 and same["num_samples"] == same["num_reference"] == NUM_REFERENCE
    assert same["precision"] == 1.0 and same["recall"] == 1.0  # every sample lies on the other manifold
    # class accuracy = the evalnet's own accuracy on these images, computed here without torch-fidelity
    net = load_domain_net(str(pipeline.root / "evalnet" / "evalnet.pt"))
    _, logits = predict(net, torch.from_numpy(images).permute(0, 3, 1, 2))
    expected = float((logits.argmax(1).numpy() == labels).mean())
    assert same["class_accuracy"] == pytest.approx(expected, abs=1e-6) and expected > 0.5
    # and with labels the samples were not asked for, the accuracy drops to the share that still matches
    wrong = (labels + 1) % 10
    _write_samples(tmp_path / "relabelled", images, wrong)
    relabelled = pipeline.evaluate(tmp_path / "relabelled", "relabelled")
    assert relabelled["class_accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == wrong).mean()), abs=1e-6)
    assert relabelled["class_accuracy"] < same["class_accuracy"]
    assert relabelled["fid"] == pytest.approx(same["fid"], abs=1e-9)  # FID ignores the labels

    # a corrupted copy (shifted by 6 pixels, half the contrast) is strictly further from the reference
    corrupted = (np.roll(images, 6, axis=2) // 2).astype(np.uint8)
    _write_samples(tmp_path / "corrupted", corrupted, labels)
    worse = pipeline.evaluate(tmp_path / "corrupted", "corrupted")
    # (the TINY evalnet's features are small, so are its FIDs: compare with the numerical floor of "same")
    assert worse["fid"] > max(100 * abs(same["fid"]), 1e-5) and worse["kid"] > same["kid"]


def test_tokenizer_quality_benchmark_prints_the_evaluate_stages_numbers(pipeline, monkeypatch, capsys):
    """`python -m spectralar.bench tokenizer-quality` on the same images gives the evaluate stage's
    reconstruction numbers, the equal-bits PCA code's included, and prints one table row per prefix."""
    from spectralar import bench

    r = pipeline.root
    written = pipeline.evaluate(r / "samples", "bench_reference")
    monkeypatch.setattr(sys, "argv", [
        "bench", "tokenizer-quality", "--tokenizer", str(r / "tokenizer" / "tokenizer.pt"), "--data",
        str(r / "prepared"), "--evalnet", str(r / "evalnet" / "evalnet.pt"), "--images", str(written["psnr_images"]),
        "--reconstruction-images", str(written["rfid_num_images"]), "--device", "cpu"])
    bench.main()
    out = capsys.readouterr().out
    table, result = out[:out.index("\n{")], json.loads(out[out.index("\n{"):])
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [str(i) for i in range(1, N_TOKENS + 1)]
    assert result["quality_summary"] == written["quality_summary"]
    assert result["reconstruction_class_accuracy"] == written["reconstruction_class_accuracy"]
    assert result["rfid"] == pytest.approx(written["rfid"], rel=1e-6)
    code = result["pca_equal_bits_code"]
    assert code["class_accuracy"] == written["pca_equal_bits_code"]["class_accuracy"]
    assert code["rfid"] == pytest.approx(written["pca_equal_bits_code"]["rfid"], rel=1e-6)


def test_realism_calibration_score_real_images_and_reconstructions_like_samples(pipeline):
    """The reference's own images scored as samples: FID 0, precision = recall = 1; their reconstructions:
    the decoder's scores, with the class accuracy recomputed image by image."""
    from spectralar.stages.evaluate import EvaluateConfig, Scorer, realism_calibration, reference_for

    root = pipeline.root
    scorer = Scorer(EvaluateConfig(), str(root / "evalnet" / "evalnet.pt"), torch.device("cpu"))
    codec = load_codec(root / "tokenizer" / "tokenizer.pt", "cpu")
    reference = reference_for(root / "reference", "domain")
    val = ImageShards(root / "prepared", "val")  # the reference's images: a known answer
    realism = realism_calibration(scorer, codec, val, NUM_REFERENCE, reference)["realism"]
    assert realism["images"] == NUM_REFERENCE
    assert abs(realism["real"]["fid"]) < 1e-3
    assert realism["real"]["precision"] == realism["real"]["recall"] == 1.0
    decoded = realism["reconstructions"]
    assert decoded["fid"] > 1e-3 and 0 <= decoded["precision"] <= 1 and 0 <= decoded["recall"] <= 1
    images, labels = _val(pipeline)
    x = to_float(torch.from_numpy(images).permute(0, 3, 1, 2))
    reconstructions = torch.cat([to_uint8(codec.decode(codec.encode(x[i:i + 1]))) for i in range(len(x))])
    _, logits = predict(load_domain_net(str(root / "evalnet" / "evalnet.pt")), reconstructions)
    assert decoded["class_accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()), abs=1e-6)
    # ADM's reference file has moments only: nothing to score precision/recall against
    assert realism_calibration(scorer, codec, val, 4, {"mu": reference["mu"], "sigma": reference["sigma"]}) == {}


# ------------------------------------------------------------------------------------------ bad sample files

GOOD_SHAPE = (32, 32, 1)


def _good(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *GOOD_SHAPE), dtype=np.uint8), np.arange(n) % 10


@pytest.mark.parametrize("case, pattern", [
    ("float", r"arr_0 must be uint8 \(N, 32, 32, 1\).*dtype torch.float32"),
    ("three_d", r"arr_0 must be uint8 .*4-D"),
    ("out_of_range", r"arr_0 must be uint8 .*range \[0, 300\]"),
    ("resolution", r"arr_0 images are 16x16 with 1 channel\(s\) but the dataset's are 32x32 with 1"),
    ("channels", r"arr_0 images are 32x32 with 3 channel\(s\) but the dataset's are 32x32 with 1"),
    ("channels_first", r"arr_0 must be uint8 .*1 or 3 channels, got 32"),
    ("labels_length", r"labels must be \(N,\) with N = 6 samples, got shape \(5,\)"),
    ("labels_range", r"labels must lie in 0\.\.9 .* got 0\.\.10"),
    ("labels_float", r"labels must be integers"),
    ("no_labels", r"missing array\(s\) \['labels'\]"),
])
def test_bad_sample_files_are_clear_errors(tmp_path, case, pattern):
    images, labels = _good()
    arrays = {"arr_0": images, "labels": labels}
    if case == "float":
        arrays["arr_0"] = images.astype(np.float32) / 255
    elif case == "three_d":
        arrays["arr_0"] = images[..., 0]
    elif case == "out_of_range":
        arrays["arr_0"] = images.astype(np.int16)
        arrays["arr_0"][0, 0, 0, 0] = 300
    elif case == "resolution":
        arrays["arr_0"] = images[:, :16, :16]
    elif case == "channels":
        arrays["arr_0"] = np.repeat(images, 3, axis=-1)
    elif case == "channels_first":
        arrays["arr_0"] = images.transpose(0, 3, 1, 2)
    elif case == "labels_length":
        arrays["labels"] = labels[:5]
    elif case == "labels_range":
        arrays["labels"] = labels.copy()
        arrays["labels"][2] = 10
    elif case == "labels_float":
        arrays["labels"] = labels.astype(np.float64)
    elif case == "no_labels":
        del arrays["labels"]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=pattern) as info:
        load_samples(path, GOOD_SHAPE, 10)
    assert str(path) in str(info.value)  # the message names the file


def test_good_sample_file_round_trips(tmp_path):
    images, labels = _good()
    np.savez(tmp_path / "ok.npz", arr_0=images, labels=labels.astype(np.int32))
    loaded, loaded_labels, ids = load_samples(tmp_path / "ok.npz", GOOD_SHAPE, 10)
    assert loaded.dtype == torch.uint8 and loaded.shape == (6, 1, 32, 32) and ids is None
    assert torch.equal(loaded, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert loaded_labels.dtype == torch.int64 and loaded_labels.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match="run the sample stage"):
        load_samples(tmp_path / "absent.npz", GOOD_SHAPE, 10)


def test_stage_rejects_a_bad_file_and_a_missing_reference(pipeline, tmp_path):
    images, labels = _val(pipeline)
    _write_samples(tmp_path / "small", images[:, :16, :16], labels)
    with pytest.raises(ValueError, match=r"samples\.npz: arr_0 images are 16x16"):
        pipeline.evaluate(tmp_path / "small", "small")
    # a truncated file with a bad shape is caught too
    shutil.copytree(pipeline.root / "samples", tmp_path / "trunc")
    _write_samples(tmp_path / "trunc" / "truncated", images.astype(np.float32), labels, "samples_drop3.npz")
    with pytest.raises(ValueError, match=r"samples_drop3\.npz: arr_0 must be uint8"):
        pipeline.evaluate(tmp_path / "trunc", "trunc")
    pipeline.set_params({"evaluate.feature_extractor": "inception"})  # reference_stats made domain.npz only
    try:
        with pytest.raises(FileNotFoundError, match=r"inception\.npz not found.*reference_stats\.extractors"):
            pipeline.evaluate(pipeline.root / "samples", "inception")
    finally:
        pipeline.set_params({})


# ------------------------------------------------------------------------------------------ truncation

def test_truncation_table_picks_up_every_truncated_file(pipeline, tmp_path):
    from spectralar.evaluation.metrics import compute_metrics, extract_features, load_reference

    images, labels = _val(pipeline)
    samples = tmp_path / "samples"
    _write_samples(samples, images, labels)
    variants = {1: images // 2, 3: np.roll(images, 3, axis=1), 5: 255 - images}
    for k, variant in variants.items():
        _write_samples(samples / "truncated", variant.astype(np.uint8), labels, f"samples_drop{k}.npz")
    (samples / "truncated" / "notes.txt").write_text("not a sample file")
    assert list(truncated_files(samples)) == [1, 3, 5]
    metrics = pipeline.evaluate(samples, "trunc_eval")
    assert list(metrics["fid_truncated"]) == ["0", "1", "3", "5"]
    assert metrics["fid_truncated"]["0"] == metrics["fid"]
    assert metrics["fid_truncated_num_samples"] == {str(k): NUM_REFERENCE for k in (0, 1, 3, 5)}
    # each FID is that of its own file, computed here directly with the library
    reference = load_reference(pipeline.root / "reference" / "domain.npz")
    kwargs = {"feature_extractor_weights_path": str(pipeline.root / "evalnet" / "evalnet.pt")}
    for k, variant in variants.items():
        features = extract_features(torch.from_numpy(variant.astype(np.uint8)).permute(0, 3, 1, 2), "domain", kwargs)
        direct = compute_metrics(features, reference, isc=False, kid=False, prc=False)["fid"]
        assert metrics["fid_truncated"][str(k)] == pytest.approx(direct, rel=1e-5, abs=1e-5)
        assert direct > max(100 * abs(metrics["fid"]), 1e-5)  # every variant differs from the reference images
    rows = _rows(pipeline.root / "trunc_eval" / "truncation.csv")
    assert [(r["k"], r["tokens_kept"]) for r in rows] == [("0", "8"), ("1", "7"), ("3", "5"), ("5", "3")]
    assert rows[0]["paper_fid"] == "3.02" and rows[3]["paper_fid"] == "3.34" and rows[1]["paper_fid"] == ""
    # k must leave at least one token of N
    _write_samples(samples / "truncated", images, labels, f"samples_drop{N_TOKENS}.npz")
    with pytest.raises(ValueError, match=rf"samples_drop{N_TOKENS}\.npz: {N_TOKENS} dropped tokens"):
        pipeline.evaluate(samples, "trunc_eval")


# ------------------------------------------------------------------------------------------ end to end

def test_evaluate_stage_end_to_end(pipeline, monkeypatch):
    from mlflow.tracking import MlflowClient

    root = pipeline.root
    store = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    metrics = pipeline.run("evaluate")
    written = json.loads((root / "evaluate.json").read_text())
    timing = json.loads((root / "evaluate.timing.json").read_text())
    assert timing["stage_seconds"] > 0 and "stage_seconds" not in written  # telemetry beside the results
    assert timing["feature_extraction_images_per_second"] > 0 and timing["feature_extraction_seconds"] > 0
    assert "feature_extraction_images_per_second" not in written
    for key in ("fid", "inception_score", "inception_score_std", "kid", "kid_std", "precision", "recall",
                "class_accuracy", "feature_extractor", "num_samples", "num_reference", "rfid", "rfid_num_images",
                "psnr_prefix", "psnr_prefix_vs_full_image", "reconstruction_class_accuracy", "fid_truncated",
                "paper"):
        assert key in written, key
    assert written["feature_extractor"] == "domain" and written["num_samples"] == 20
    assert written["num_reference"] == NUM_REFERENCE and written["rfid_num_images"] == written["psnr_images"] == 10
    assert written["fid"] > 0 and 1 <= written["inception_score"] <= 10 and 0 <= written["class_accuracy"] <= 1
    assert list(written["fid_truncated"]) == ["0", "2"]  # TINY sample.truncate: [0, 2]
    assert written["fid_truncated"]["0"] == written["fid"] and written["fid_truncated"]["2"] > 0
    assert list(written["class_accuracy_truncated"]) == list(written["inception_score_truncated"]) == ["0", "2"]
    assert written["fid_truncated_num_samples"] == {"0": 20, "2": 20}
    assert written["paper"]["fid_truncated"] == {"0": 3.02, "5": 3.34, "10": 6.65, "15": 27.69}
    assert written["paper"]["rfid"] == 4.03 and "ImageNet" in written["paper"]["note"]
    # prefix PSNRs are the tokenizer's own evaluation of the same 10 val images (train_tokenizer's metrics)
    tokenizer = json.loads((root / "train_tokenizer.json").read_text())
    assert written["psnr_prefix"] == pytest.approx(tokenizer["psnr_prefix"], abs=2e-3)
    assert written["psnr_prefix_vs_full_image"] == pytest.approx(tokenizer["psnr_prefix_vs_full_image"], abs=2e-3)
    # reconstruction class accuracy, computed here image by image
    codec = load_codec(root / "tokenizer" / "tokenizer.pt", "cpu")
    images, labels = _val(pipeline, 10)
    x = to_float(torch.from_numpy(images).permute(0, 3, 1, 2))
    reconstructions = torch.cat([to_uint8(codec.decode(codec.encode(x[i:i + 1]))) for i in range(10)])
    _, logits = predict(load_domain_net(str(root / "evalnet" / "evalnet.pt")), reconstructions)
    assert written["reconstruction_class_accuracy"] == pytest.approx(
        float((logits.argmax(1).numpy() == labels).mean()), abs=1e-6)
    assert written["rfid"] > 0 and metrics["fid"] == written["fid"]
    # real train images and their reconstructions, scored like the 20 samples
    realism = written["realism"]
    assert realism["images"] == 20 and set(realism) == {"images", "real", "reconstructions", "pca_equal_bits"}
    for scored in (realism["real"], realism["reconstructions"], realism["pca_equal_bits"]):
        assert set(scored) == {"fid", "precision", "recall", "class_accuracy"} and scored["fid"] > 0
    # the quality table's reference codes on the same 10 images, recomputed from their definitions
    from spectralar.evaluation.baselines import dct_ceiling_psnr, fit_pca, pca_reconstruct
    from spectralar.evaluation.quality import equal_bits_pca, float_images, reference_codes

    omegas = written["omegas"]
    assert written["dct_ceiling"] == pytest.approx([dct_ceiling_psnr(x.double(), w) for w in omegas], abs=1e-3)
    assert written["dct_ceiling"][-1] == pytest.approx(100.0)  # ω_N = H: I'_N is the image
    codebook = TINY["tokenizer.codebook_size"]  # 32 codes: 5 bits a token
    assert written["pca_components"] == [i * 5 // 8 for i in range(1, N_TOKENS + 1)]
    train = ImageShards(root / "prepared", "train")
    assert written["pca_fit_images"] == len(train)  # baseline_images (10000) > the tiny split: all of it
    pca = equal_bits_pca(train, N_TOKENS, codebook, 10000)
    assert reference_codes(pca, x.double(), omegas)["pca_equal_bits"] == written["pca_equal_bits"]
    # the PCA code of all N tokens' bits on the same 10 images, on the perceptual measures: rebuilt from the
    # basis functions (every train image, the last prefix's components, 8 bits a coefficient, uint8 out)
    k = written["pca_components"][-1]
    basis = fit_pca(float_images(train, np.arange(len(train))), k)
    simple = to_uint8(pca_reconstruct(basis, x.double(), k, 8).float())
    _, logits = predict(load_domain_net(str(root / "evalnet" / "evalnet.pt")), simple)
    code = written["pca_equal_bits_code"]
    assert code["components"] == k and code["bits"] == 8 and code["rfid"] > 0
    assert code["class_accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()), abs=1e-6)
    assert written["pca_equal_bits"] == sorted(written["pca_equal_bits"])  # more bits, more components, less error
    assert len(written["proxy_ceiling"]) == N_TOKENS and all(p > 0 for p in written["proxy_ceiling"])
    summary = written["quality_summary"]
    assert summary["margin_over_pca_db"] == pytest.approx(written["psnr_prefix_vs_full_image"][-1]
                                                          - written["pca_equal_bits"][-1], abs=1e-3)
    assert summary["min_psnr_vs_target"] == pytest.approx(min(written["psnr_prefix"]), abs=1e-3)
    # the three tables
    out = root / "evaluate"
    generation = _rows(out / "generation.csv")
    assert [r["source"] for r in generation] == ["ours", "paper (SpectralAR-d16)"]
    assert float(generation[0]["fid"]) == pytest.approx(written["fid"], rel=1e-5)  # 6 significant digits
    assert generation[1]["fid"] == "3.02" and generation[1]["dataset"] == "ImageNet 256x256"
    truncation = _rows(out / "truncation.csv")
    assert list(truncation[0]) == ["k", "tokens_kept", "fid", "inception_score", "class_accuracy", "num_samples",
                                   "paper_fid"]
    assert [(r["k"], r["tokens_kept"]) for r in truncation] == [("0", "8"), ("2", "6")]
    reconstruction = _rows(out / "reconstruction.csv")
    assert [int(r["prefix"]) for r in reconstruction] == list(range(1, N_TOKENS + 1))
    assert [int(r["omega"]) for r in reconstruction] == [1, 2, 3, 4, 6, 8, 20, 32]
    assert float(reconstruction[-1]["psnr_vs_image"]) == pytest.approx(written["psnr_prefix_vs_full_image"][-1])
    assert {"psnr_vs_target", "dct_ceiling", "pca_equal_bits", "pca_components", "proxy_ceiling", "bits"} <= set(reconstruction[0])
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "evaluate" and set(config["params"]) == {"run", "evaluate"}
    # the tables are MLflow artifacts of the stage's run, beside the metrics
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("spectralar").experiment_id],
                                filter_string="tags.`spectralar.stage` = 'evaluate'")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"generation.csv", "truncation.csv", "reconstruction.csv", "config.json", "evaluate.json"} <= artifacts
    assert run.data.metrics["fid"] == pytest.approx(written["fid"]) and run.data.metrics["fid_truncated.2"] > 0


def test_prefix_psnr_uses_psnr_images_of_the_val_split(pipeline):
    pipeline.set_params({"evaluate.psnr_images": 4})
    try:
        metrics = pipeline.evaluate(pipeline.root / "samples", "psnr4")
    finally:
        pipeline.set_params({})
    assert metrics["psnr_images"] == 4 and metrics["rfid_num_images"] == metrics["reconstruction_images"] == 10
    assert {r["num_images"] for r in _rows(pipeline.root / "psnr4" / "reconstruction.csv")} == {"4"}
    # the mean PSNR of 4 spread val images, from train_tokenizer's evaluation run here directly
    from spectralar.evaluation.reconstruction import prefix_psnr as evaluate

    codec = load_codec(pipeline.root / "tokenizer" / "tokenizer.pt", "cpu")
    direct = evaluate(codec, ImageShards(pipeline.root / "prepared", "val"), 4, torch.device("cpu"))
    assert metrics["psnr_prefix"] == direct["psnr_prefix"]
