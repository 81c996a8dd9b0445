"""train_evalnet, reference_stats and correlation on a tiny prepared dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spectralar.cli import build_parser, run_stage
from spectralar.evaluation.metrics import compute_metrics, load_reference
from tests.conftest import TINY, write_params


@pytest.fixture
def tiny(tmp_path, fashion_dir):
    params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(fashion_dir), **TINY})

    def run(stage, *paths):
        argv = [stage, "--params", str(params), "--metrics", str(tmp_path / f"{stage}.json"), *map(str, paths)]
        return run_stage(stage, build_parser().parse_args(argv))

    run("prepare", "--out", tmp_path / "prepared")
    return tmp_path, run


def test_evalnet_and_reference_stats(tiny):
    root, run = tiny
    metrics = run("train_evalnet", "--data", root / "prepared", "--out", root / "evalnet")
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["train_images"] == 60
    stats = run("reference_stats", "--data", root / "prepared", "--evalnet", root / "evalnet" / "evalnet.pt",
                "--out", root / "reference")
    assert stats["num_images"] == 20 and stats["domain"]["feature_dim"] == 16
    timing = json.loads((root / "reference_stats.timing.json").read_text())  # the extractor's rate: telemetry
    assert timing["domain_images_per_second"] > 0
    assert "domain_images_per_second" not in json.loads((root / "reference_stats.json").read_text())
    reference = load_reference(root / "reference" / "domain.npz")
    assert reference["mu"].shape == (16,) and reference["sigma"].dtype == np.float64
    # the reference against itself: FID ~ 0 (the stage output is usable by torch-fidelity's metric code)
    same = compute_metrics({"features": reference["features"]}, reference, fid=True, isc=False, kid=False, prc=False)
    assert abs(same["fid"]) < 1e-3


def test_reference_stats_needs_the_evalnet(tiny):
    root, run = tiny
    with pytest.raises(FileNotFoundError, match="train_evalnet"):
        run("reference_stats", "--data", root / "prepared", "--evalnet", root / "absent.pt", "--out", root / "ref")


def test_correlation_stage_writes_table_and_figure(tiny):
    root, run = tiny
    metrics = run("correlation", "--data", root / "prepared", "--out", root / "corr")
    for paradigm in ("raster", "scale", "spectral"):
        assert set(metrics[paradigm]) == {"r2_t2", "r2_t3", "r2_t4", "average"}
    assert metrics["paper_table1"]["spectral"]["average"] == 0.962
    assert (root / "corr" / "best_predictor.png").stat().st_size > 1000
    rows = (root / "corr" / "table1.csv").read_text().splitlines()
    assert rows[0].startswith("paradigm,r2_t2") and len(rows) == 4
    assert json.loads((root / "correlation.json").read_text())["num_images"] == 20
