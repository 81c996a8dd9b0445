"""The report stage on hand-made metrics files: tables beside the paper's, figures, sweep rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from spectralar.cli import build_parser, run_stage
from spectralar.stages.report import PAPER_TABLE4, ablation_table
from tests.conftest import REPO, default_params, write_params

EVALUATE = {
    "fid": 21.5, "inception_score": 4.2, "kid": 0.01, "precision": 0.6, "recall": 0.4, "class_accuracy": 0.55,
    "rfid": 9.5, "reconstruction_class_accuracy": 0.6, "feature_extractor": "domain", "num_samples": 1000,
    "num_reference": 10000, "omegas": [1, 2], "psnr_prefix": [22.0, 18.0], "psnr_prefix_vs_full_image": [10.0, 18.0],
    "fid_truncated": {"0": 21.5, "2": 30.0}, "fid_truncated_num_samples": {"0": 1000, "2": 1000},
    "paper": {"fid": 3.02, "fid_truncated": {"0": 3.02, "5": 3.34}},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    for stage, metrics in {"prepare": {"images": 70000}, "evaluate": EVALUATE,
                           "correlation": {"raster": {"r2_t2": 0.5, "r2_t3": 0.4, "r2_t4": 0.6, "average": 0.5},
                                           "paper_table1": {"raster": {"average": 0.454}}}}.items():
        (tmp_path / "metrics" / f"{stage}.json").write_text(json.dumps(metrics))
    for stage, seconds in {"prepare": 3.0, "evaluate": 20.0}.items():  # telemetry beside the results
        (tmp_path / "metrics" / f"{stage}.timing.json").write_text(json.dumps({"stage_seconds": seconds}))
    (tmp_path / "models" / "generator").mkdir(parents=True)
    (tmp_path / "models" / "generator" / "history.csv").write_text("step,loss,accuracy\n1,5.0,0.1\n2,4.0,0.2\n")
    (tmp_path / "samples").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "samples" / "grid.png")
    params = write_params(tmp_path / "params.yaml")

    def run():
        argv = ["report", "--params", str(params), "--metrics", "metrics/report.json"]
        return run_stage("report", build_parser().parse_args(argv))

    return tmp_path, run


def test_report_without_a_sweep_holds_this_pipelines_row(project):
    root, run = project
    metrics = run()
    assert metrics["ablation_rows_run"] == 1 and metrics["sweep_table"] is None
    with open(root / "reports" / "ablation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["row", "spectral_supervision", "causal_mask", "nonuniform_mapping"]
    assert {"fid", "inception_score", "paper_fid", "paper_inception_score"} <= set(rows[0])
    by_row = {r["row"]: r for r in rows}
    assert by_row["nonuniform"]["fid"] == "21.5" and by_row["nonuniform"]["source"] == "this pipeline"
    assert by_row["baseline"]["causal_mask"] == "false"  # as in the sweep table and `-S` overrides
    assert by_row["baseline"]["fid"] == "" and by_row["baseline"]["source"] == "not run"
    assert by_row["baseline"]["paper_fid"] == "6.3" and by_row["causal"]["paper_inception_score"] == "222.6"
    text = (root / "reports" / "report.md").read_text()
    assert "## Ablation (Table 4)" in text and "| 21.5 |" in text
    assert "![samples_grid.png](figures/samples_grid.png)" in text and "![loss_curves.png](figures/loss_curves.png)" in text
    assert (root / "reports" / "figures" / "loss_curves.png").stat().st_size > 1000
    truncation = list(csv.DictReader(open(root / "reports" / "truncation.csv")))
    assert [(r["source"], r["dropped"], r["tokens_kept"], r["fid"]) for r in truncation] == [
        ("ours", "0", "16", "21.5"), ("ours", "2", "14", "30.0"), ("paper", "0", "64", "3.02"), ("paper", "5", "59", "3.34")]
    assert truncation[1]["fraction_kept"] == "0.875"
    stages = list(csv.DictReader(open(root / "reports" / "stages.csv")))
    assert [(r["stage"], r["seconds"]) for r in stages] == [("prepare", "3.0"), ("evaluate", "20.0")]


def test_report_takes_table4_rows_from_the_sweep_table(project):
    root, run = project
    (root / "runs" / "ablation").mkdir(parents=True)
    (root / "runs" / "ablation" / "table.csv").write_text(
        "row,spectral_supervision,causal_mask,nonuniform_mapping,fid,inception_score,class_accuracy\n"
        "baseline,false,false,false,40.0,3.0,0.3\nspectral,true,false,false,35.0,3.5,0.35\n")
    metrics = run()
    assert metrics["ablation_rows_run"] == 3  # two from the sweep, the last from this pipeline
    rows = {r["row"]: r for r in csv.DictReader(open(root / "reports" / "ablation.csv"))}
    assert rows["baseline"]["fid"] == "40.0" and rows["baseline"]["source"] == "sweep"
    assert rows["causal"]["source"] == "not run"


def test_paper_table4_and_switch_parsing():
    assert PAPER_TABLE4[(True, True, True)] == (3.02, 282.2)
    rows = default_params()["sweeps"]["ablation"]
    table = ablation_table(rows, default_params()["tokenizer"], None, None)
    assert [r["paper_fid"] for r in table] == [6.30, 5.64, 3.49, 3.02]
    assert all(r["source"] == "not run" for r in table)
    with pytest.raises(ValueError, match="not a boolean switch"):
        ablation_table({"x": {"tokenizer.causal_mask": "maybe"}}, default_params()["tokenizer"], None, None)


def test_report_is_the_last_stage():
    from spectralar.dag import load_dag
    from spectralar.stages import STAGES

    assert STAGES[-1] == "report" and list(load_dag(REPO / "dvc.yaml"))[-1] == "report"  # its Snakemake rule too
