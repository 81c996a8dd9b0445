"""The report stage on hand-made metrics files: tables beside the paper's, figures, sweep rows."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
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
    # Table 4 without a common schedule: this pipeline's run counts as a run of its row (the tests of
    # sweeps.ablation.schedule put it back)
    ablation = {k: v for k, v in default_params()["sweeps"]["ablation"].items() if k != "schedule"}
    params = write_params(tmp_path / "params.yaml", {"sweeps.ablation": ablation})

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


def test_table2_sets_real_images_and_their_reconstructions_beside_the_samples(project):
    root, run = project
    realism = {"images": 1000, "real": {"fid": 3.25, "precision": 0.71, "recall": 0.69, "class_accuracy": 0.93},
               "reconstructions": {"fid": 40.5, "precision": 0.65, "recall": 0.21, "class_accuracy": 0.77}}
    (root / "metrics" / "evaluate.json").write_text(json.dumps(EVALUATE | {"realism": realism}))
    run()
    text = (root / "reports" / "report.md").read_text()
    assert "| metric | ours | real images | their reconstructions | paper (d16) |" in text
    assert "| fid | 21.5 | 3.25 | 40.5 | 3.02 |" in text and "| recall | 0.4 | 0.69 | 0.21 | — |" in text
    assert "| kid | 0.01 | — | — | — |" in text and "1000 train images (not among the references)" in text


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


def test_with_a_common_schedule_this_pipeline_is_no_run_of_table4(project):
    root, run = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweeps"]["ablation"]["schedule"] = {"train_generator.steps": 250}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "runs" / "ablation").mkdir(parents=True)
    (root / "runs" / "ablation" / "table.csv").write_text(SEEDED_SWEEP)
    assert run()["ablation_rows_run"] == 2
    lines = list(csv.DictReader(open(root / "reports" / "ablation.csv")))
    nonuniform = [r for r in lines if r["row"] == "nonuniform"]
    assert [(r["seed"], r["source"]) for r in nonuniform] == [("1", "sweep"), ("2", "sweep"), ("", "sweep")]
    assert all(r["source"] != "this pipeline" for r in lines)
    text = (root / "reports" / "report.md").read_text()
    assert "common schedule (`sweeps.ablation.schedule`: `train_generator.steps: 250`)" in text


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


# --------------------------------------------------------------------------------------------
# Curves: one per quantity, in the report's figure and in `dvc plots`
# --------------------------------------------------------------------------------------------

TOKENIZER_HISTORY = ("phase,step,ce,l2,loss,vq\n1,2,3.45,,3.53,0.08\n1,4,3.41,,3.42,0.001\n"
                     "2,6,,0.17,0.18,\n2,8,,0.13,0.14,\n")
GENERATOR_HISTORY = "step,accuracy,loss,val_accuracy,val_loss\n2,0.1,3.4,,\n3,0.15,3.35,0.12,3.5\n4,0.2,3.3,,\n"


def _history(path: Path, text: str) -> list[dict[str, float]]:
    from spectralar.artifacts import read_history

    path.write_text(text)
    return read_history(path)


def test_tokenizer_stages_are_separate_panels_and_a_sparse_validation_column_is_a_curve(tmp_path):
    from spectralar.stages.report import _curve, loss_panels, plot_losses

    histories = {"tokenizer": _history(tmp_path / "t.csv", TOKENIZER_HISTORY),
                 "generator": _history(tmp_path / "g.csv", "step,accuracy,loss,val_loss\n2,0.1,3.4,3.5\n4,0.2,3.3,\n")}
    panels = {(title, column): rows for title, rows, column, _ in loss_panels(histories)}
    stage1 = panels[("tokenizer stage 1: proxy codes", "ce")]
    stage2 = panels[("tokenizer stage 2: pixels", "l2")]
    assert [r["step"] for r in stage1] == [2, 4] and [r["step"] for r in stage2] == [6, 8]  # never joined
    assert ("generator: next token", "loss") in panels and ("generator: next token", "accuracy") in panels
    assert loss_panels({"generator": [], "tokenizer": []}) == []
    assert _curve(panels[("generator: next token", "loss")], "val_loss") == ([2.0], [3.5])  # blank rows skipped
    assert plot_losses(histories, tmp_path / "a.png") and plot_losses(histories, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # no version stamp, same bytes


def _dvc_plots() -> list[dict]:
    entries = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    return [entry if isinstance(entry, dict) else {entry: {}} for entry in entries]


def test_dvc_plots_have_titles_axis_labels_and_one_quantity_each():
    curves, images = {}, []
    for entry in _dvc_plots():
        (name, spec), = entry.items()
        if not spec:
            images.append(name)
            continue
        curves[name] = spec
        assert {"title", "x", "y", "x_label", "y_label", "template"} <= set(spec), name
        assert (REPO / spec["template"]).is_file(), name
        (source, columns), = spec["y"].items()
        assert isinstance(columns, str) or len(columns) == 1, f"{name}: one quantity per plot"
    sources = {name: next(iter(spec["y"].items())) for name, spec in curves.items()}
    assert sources["tokenizer_stage1"] == ("models/tokenizer/history.csv", "ce")
    assert sources["tokenizer_stage2"] == ("models/tokenizer/history.csv", "l2")
    assert {"samples/grid.png", "samples/progression.png"} <= set(images)


def test_dvc_plots_show_gives_titles_labels_and_skips_the_other_stages_rows(tmp_path):
    """`dvc plots show --json` on histories shaped as train_tokenizer writes them: each curve has its
    title and axis labels, and its template drops the rows where its column is blank."""
    (tmp_path / "workflow" / "report").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "workflow" / "report" / "dvc_curve.json", tmp_path / "workflow" / "report")
    for path, text in {"models/tokenizer/history.csv": TOKENIZER_HISTORY,
                       "models/generator/history.csv": GENERATOR_HISTORY}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path)}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True, capture_output=True)
    shown = subprocess.run([dvc, "plots", "show", "--json"], cwd=tmp_path, env=env, check=True, capture_output=True,
                           text=True)
    plots = json.loads(shown.stdout)["data"]
    expected = {"tokenizer_stage1": ("ce", [2, 4]), "tokenizer_stage2": ("l2", [6, 8]),
                "generator_val_loss": ("val_loss", [3])}
    for name, (column, steps) in expected.items():
        (plot,) = plots[name]
        content = plot["content"]
        assert content["title"]["text"].startswith(("Tokenizer", "Generator"))
        assert content["encoding"]["x"]["title"] == "optimizer step" and content["encoding"]["y"]["title"]
        (rule,) = content["transform"]
        keep = [row for row in content["data"]["values"]
                if row[column] != "" and row[column] is not None]  # the template's filter, in Python
        assert rule["filter"] == f"datum['{column}'] !== '' && isValid(datum['{column}'])"
        assert [int(row["step"]) for row in keep] == steps
    assert plots["generator_loss"][0]["content"]["encoding"]["y"]["title"] == "cross-entropy (nats)"


# --------------------------------------------------------------------------------------------
# Table 4 and Table 1 over seeds
# --------------------------------------------------------------------------------------------

SEEDED_SWEEP = (  # runs/ablation/table.csv of a sweep with seeds [0, 1, 2]; nonuniform at seed 0 is this pipeline
    "row,spectral_supervision,causal_mask,nonuniform_mapping,seed,fid,inception_score,class_accuracy,rfid,"
    "fid_drop2,generator_val_loss,generator_val_accuracy,r2_spectral_average,r2_raster_average\n"
    "baseline,false,false,false,0,40.0,3.0,0.30,30.0,41.0,1.5,0.6,0.80,0.50\n"
    "baseline,false,false,false,1,44.0,3.2,0.32,31.0,45.0,1.4,0.61,0.82,0.52\n"
    "baseline,false,false,false,2,42.5,3.1,0.31,33.0,43.0,1.6,0.62,0.81,0.49\n"
    "nonuniform,true,true,true,1,20.0,4.0,0.5,8.0,20.5,1.0,0.7,0.82,0.52\n"
    "nonuniform,true,true,true,2,22.0,4.4,0.6,9.0,22.5,1.1,0.72,0.81,0.49\n")


def test_report_averages_each_row_over_its_seeds(project):
    root, run = project
    (root / "metrics" / "train_generator.json").write_text(json.dumps({"val_loss": 1.2, "val_accuracy": 0.75}))
    (root / "runs" / "ablation").mkdir(parents=True)
    (root / "runs" / "ablation" / "table.csv").write_text(SEEDED_SWEEP)
    assert run()["ablation_rows_run"] == 2
    lines = list(csv.DictReader(open(root / "reports" / "ablation.csv")))
    assert list(lines[0])[:4] == ["row", "spectral_supervision", "causal_mask", "nonuniform_mapping"]
    baseline = [r for r in lines if r["row"] == "baseline"]
    assert [r["kind"] for r in baseline] == ["seed", "seed", "seed", "mean ± std"]
    summary = baseline[-1]
    fids = np.array([40.0, 44.0, 42.5])
    assert float(summary["fid"]) == pytest.approx(fids.mean()) and float(summary["fid_std"]) == pytest.approx(fids.std(ddof=1))
    gaps = fids - np.array([30.0, 31.0, 33.0])
    assert float(summary["fid_minus_rfid_std"]) == pytest.approx(gaps.std(ddof=1))
    assert summary["num_seeds"] == "3" and summary["seeds"] == "0 1 2" and summary["source"] == "sweep"
    # nonuniform: seeds 1 and 2 from the sweep, seed 0 (params' run.seed) from this pipeline's metrics
    nonuniform = [r for r in lines if r["row"] == "nonuniform"]
    assert [(r["seed"], r["source"]) for r in nonuniform[:3]] == [("0", "this pipeline"), ("1", "sweep"), ("2", "sweep")]
    assert nonuniform[0]["generator_val_loss"] == "1.2" and nonuniform[0]["fid_minus_rfid"] == "12.0"
    losses = np.array([1.2, 1.0, 1.1])
    assert float(nonuniform[-1]["generator_val_loss"]) == pytest.approx(losses.mean())
    assert float(nonuniform[-1]["generator_val_loss_std"]) == pytest.approx(losses.std(ddof=1))
    assert nonuniform[-1]["source"] == "this pipeline + sweep" and nonuniform[-1]["num_seeds"] == "3"
    assert [r["source"] for r in lines if r["kind"] == "mean ± std"] == [
        "sweep", "not run", "not run", "this pipeline + sweep"]
    # Table 1: seed 0 from this pipeline's correlation metrics, seeds 1 and 2 from the sweep table
    correlation = [r for r in csv.DictReader(open(root / "reports" / "correlation.csv")) if r["paradigm"] == "raster"]
    averages = np.array([0.5, 0.52, 0.49])
    assert [r["seed"] for r in correlation[:3]] == ["0", "1", "2"]
    assert float(correlation[-1]["average"]) == pytest.approx(averages.mean())
    assert float(correlation[-1]["average_std"]) == pytest.approx(averages.std(ddof=1))
    text = (root / "reports" / "report.md").read_text()
    table4 = text[text.index("## Ablation (Table 4)"):text.index("## Truncated generation")]
    assert f"{fids.mean():.4g} ± {fids.std(ddof=1):.2g}" in table4 and "ddof=1" in table4
    assert "Paper's claim (gFID, lower is better): baseline > spectral > causal > nonuniform" in table4
    assert "| baseline → spectral |" in table4 and "not run" in table4
    assert "The whole ordering does not hold by this rule." in table4


def test_ordering_verdicts_state_the_rule_and_do_not_over_claim():
    from spectralar.stages.report import ordering_verdicts, seed_statistics

    assert seed_statistics([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)), 2)  # ddof=1
    assert seed_statistics([5.0]) == (5.0, None, 1) and seed_statistics([None]) == (None, None, 0)
    lines = [{"row": "a", "fid": 10.0, "fid_std": 1.0}, {"row": "b", "fid": 7.0, "fid_std": 1.0},  # 3 > 2: holds
             {"row": "c", "fid": 5.5, "fid_std": 0.5},  # 1.5 = 1.5: not more than the std sum
             {"row": "d", "fid": 8.0, "fid_std": 0.5},  # worse by 2.5 > 1.0: reversed
             {"row": "e", "fid": 1.0, "fid_std": None}]  # one seed
    verdicts = ordering_verdicts(lines, "row", "fid", ["a", "b", "c", "d", "e", "f"], lower_is_better=True)
    assert [v["verdict"] for v in verdicts] == ["holds", "unresolved (|Δ| ≤ std sum)", "reversed",
                                                "one seed: not judged", "not run"]
    assert verdicts[0]["difference"] == -3.0 and verdicts[0]["spread"] == 2.0
    higher = ordering_verdicts([{"p": "x", "r": 0.5, "r_std": 0.01}, {"p": "y", "r": 0.9, "r_std": 0.01}], "p", "r",
                               ["x", "y"], lower_is_better=False)
    assert higher[0]["verdict"] == "holds"
