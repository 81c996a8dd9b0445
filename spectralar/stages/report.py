"""report: one Markdown page of the pipeline's results beside the paper's, and the pipeline's MLflow record.

Reads only files other stages wrote (their metrics JSON is the source of truth) and writes
``reports/report.md`` with ``reports/ablation.csv`` (Table 4), ``reports/truncation.csv`` (Table 3),
``reports/correlation.csv`` (Table 1), ``reports/stages.csv`` (seconds per stage: telemetry, untracked) and
``reports/figures/`` (sample grid, coarse-to-fine progression and its GIF, spectrum completion,
super-resolution, tokenizer prefixes, loss curves, Figure 4).

Table 4's rows come from ``runs/ablation/table.csv`` when a sweep wrote it (``snakemake ablation``, or
``python -m spectralar.sweep collect ablation`` after the DVC experiments); otherwise the table holds
this pipeline's own row and marks the others as not run. The paper's numbers are ImageNet-256 with
Inception features: they show the protocol and the expected ordering, not a target for the default.

Last, the stage completes the pipeline's MLflow record: stages restored from DVC's run cache never
executed and so never logged, and the report logs them from their metrics files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from spectralar.artifacts import HISTORY, read_history
from spectralar.evaluation.headline import HEADLINE_METRICS
from spectralar.io import atomic_path, csv_text, read_json, rerun_hint, timing_file, write_text
from spectralar.stages import STAGES


# Paper Table 4 (ImageNet 256, d16): (spectral supervision, causal mask, non-uniform mapping) -> gFID, IS.
PAPER_TABLE4: dict[tuple[bool, bool, bool], tuple[float, float]] = {
    (False, False, False): (6.30, 190.1),
    (True, False, False): (5.64, 255.1),
    (True, True, False): (3.49, 222.6),
    (True, True, True): (3.02, 282.2),
}
SWITCHES = ("spectral_supervision", "causal_mask", "nonuniform_mapping")
# Figures copied next to the report: (CLI argument naming the stage output, file in it, name in figures/).
FIGURES = (
    ("samples", "grid.png", "samples_grid.png"),
    ("samples", "progression.png", "progression.png"),
    ("samples", "progression.gif", "progression.gif"),
    ("samples", "completion.png", "completion.png"),
    ("samples", "superres.png", "superres.png"),
    ("tokenizer", "prefixes.png", "tokenizer_prefixes.png"),
    ("correlation", "best_predictor.png", "best_predictor.png"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-dir", default="metrics", help="every stage's metrics JSON")
    parser.add_argument("--tokenizer", default="models/tokenizer", help="train_tokenizer output (history.csv)")
    parser.add_argument("--generator", default="models/generator", help="train_generator output (history.csv)")
    parser.add_argument("--samples", default="samples", help="sample stage output (figures)")
    parser.add_argument("--correlation", default="reports/correlation", help="correlation stage output")
    parser.add_argument("--ablation", default="runs/ablation/table.csv",
                        help="sweep table of Table 4's rows (optional: absent = only this pipeline's row)")
    parser.add_argument("--out", default="reports", help="directory of report.md, the CSVs and figures/")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean switch: {value!r}")


def _number(value: Any) -> Optional[float]:
    if value in (None, ""):
        return None
    return float(value)


def ablation_table(rows: Mapping[str, Mapping[str, Any]], tokenizer: Mapping[str, Any],
                   evaluate: Optional[Mapping[str, Any]], sweep_table: Optional[Sequence[Mapping[str, str]]]) -> list[dict]:
    """Table 4: one line per row of ``sweeps.ablation`` with its switches, our FID/IS and the paper's.

    Metrics come from the sweep table when there is one; otherwise only the row whose switches equal
    this pipeline's tokenizer gets this pipeline's metrics, and the others are marked not run.
    """
    by_row = {line["row"]: line for line in sweep_table or []}
    own = tuple(bool(tokenizer[s]) for s in SWITCHES)
    table = []
    for row, overrides in rows.items():
        switches = tuple(_bool(overrides.get(f"tokenizer.{s}", tokenizer[s])) for s in SWITCHES)
        line: dict[str, Any] = {"row": row, **dict(zip(SWITCHES, switches))}
        found = by_row.get(row)
        if found is not None and found.get("fid") not in (None, ""):
            line.update(fid=_number(found["fid"]), inception_score=_number(found.get("inception_score")),
                        class_accuracy=_number(found.get("class_accuracy")), source="sweep")
        elif switches == own and evaluate is not None:
            line.update(fid=evaluate.get("fid"), inception_score=evaluate.get("inception_score"),
                        class_accuracy=evaluate.get("class_accuracy"), source="this pipeline")
        else:
            line.update(fid=None, inception_score=None, class_accuracy=None, source="not run")
        paper = PAPER_TABLE4.get(switches)
        line.update(paper_fid=paper[0] if paper else None, paper_inception_score=paper[1] if paper else None)
        table.append(line)
    return table


def truncation_table(evaluate: Mapping[str, Any], num_tokens: int) -> list[dict]:
    """Table 3: FID when the last k tokens are dropped, ours then the paper's (64 tokens, so compare
    by the fraction of tokens kept, not by k)."""
    counts = evaluate.get("fid_truncated_num_samples", {})
    rows = [{"source": "ours", "dropped": int(k), "tokens_kept": num_tokens - int(k),
             "fraction_kept": round((num_tokens - int(k)) / num_tokens, 3), "fid": v, "num_samples": counts.get(k)}
            for k, v in sorted(evaluate.get("fid_truncated", {}).items(), key=lambda kv: int(kv[0]))]
    paper = (evaluate.get("paper") or {}).get("fid_truncated", {})
    total = int((evaluate.get("paper") or {}).get("num_tokens", 64))
    rows += [{"source": "paper", "dropped": int(k), "tokens_kept": total - int(k),
              "fraction_kept": round((total - int(k)) / total, 3), "fid": v, "num_samples": 50000}
             for k, v in sorted(paper.items(), key=lambda kv: int(kv[0]))]
    return rows


def correlation_table(correlation: Mapping[str, Any]) -> list[dict]:
    paper = correlation.get("paper_table1", {})
    keys = ("r2_t2", "r2_t3", "r2_t4", "average")
    return [{"paradigm": p, **{k: correlation[p][k] for k in keys}, **{f"paper_{k}": paper.get(p, {}).get(k) for k in keys}}
            for p in ("raster", "scale", "spectral") if p in correlation]


def stage_table(metrics_dir: Path) -> list[dict]:
    """Seconds per stage from the timing files beside the metrics (telemetry of the last run of each)."""
    rows = []
    for name in STAGES:
        path = timing_file(metrics_dir / f"{name}.json")
        if path.is_file():
            rows.append({"stage": name, "seconds": read_json(path).get("stage_seconds")})
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    if not rows:
        return "_(nothing to show)_\n"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def plot_losses(histories: Mapping[str, list[dict[str, float]]], path: Path) -> bool:
    """Loss against step, one panel per training stage; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {name: rows for name, rows in histories.items() if rows and "loss" in rows[0]}
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], present.items()):
        phases = sorted({row.get("phase", 1.0) for row in rows})
        for phase in phases:
            part = [row for row in rows if row.get("phase", 1.0) == phase]
            label = f"stage {int(phase)}" if len(phases) > 1 else None
            ax.plot([row["step"] for row in part], [row["loss"] for row in part], marker=".", label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if len(phases) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------

def read_metrics(directory: Path) -> dict[str, dict]:
    return {name: read_json(directory / f"{name}.json", rerun_hint(name, directory / f"{name}.json"))
            for name in STAGES if name != "report" and (directory / f"{name}.json").is_file()}


def render(ctx_params, metrics: Mapping[str, Mapping[str, Any]], tables: Mapping[str, list[dict]],
           figures: Sequence[str]) -> str:
    evaluate = metrics.get("evaluate", {})
    tokenizer = ctx_params.tokenizer
    lines = ["# SpectralAR report", "",
             f"Params file `{ctx_params.path}`; dataset `{ctx_params.data.source}` at {ctx_params.data.resolution} px; "
             f"tokenizer N = {tokenizer.num_tokens} tokens, codebook {tokenizer.codebook_size}; "
             f"generator depth {ctx_params.generator.depth}. Numbers come from `metrics/*.json`. The paper's columns are "
             "ImageNet 256×256 with Inception features and 64 tokens: they show the protocol and the expected "
             "ordering, not a target for this dataset.", ""]
    if evaluate:
        lines += ["## Generation and reconstruction (Table 2)", "",
                  f"Feature extractor `{evaluate.get('feature_extractor')}`, {evaluate.get('num_samples')} samples "
                  f"against {evaluate.get('num_reference')} reference images.", ""]
        paper = evaluate.get("paper", {})
        keys = HEADLINE_METRICS + ("reconstruction_class_accuracy",)
        lines.append(markdown_table([{"metric": k, "ours": evaluate.get(k), "paper (d16)": paper.get(k)}
                                     for k in keys if k in evaluate]))
    lines += ["## Ablation (Table 4)", "", "gFID / IS per row of `sweeps.ablation`; `source` says where the "
              "numbers come from (`snakemake ablation` or the DVC sweep fill in the rows marked not run).", "",
              markdown_table(tables["ablation"]), "## Truncated generation (Table 3)", "",
              "FID of the same samples decoded from their first N−k tokens; the paper's rows drop k of 64.", "",
              markdown_table(tables["truncation"]), "## Token correlation (Table 1)", "",
              "Held-out R² of token t_k regressed on t_1..t_{k−1} (protocol in the README).", "",
              markdown_table(tables["correlation"])]
    if "psnr_prefix" in evaluate:
        omegas = evaluate.get("omegas") or [None] * len(evaluate["psnr_prefix"])
        rows = [{"tokens": i + 1, "omega": omegas[i], "PSNR vs I'_i (dB)": p,
                 "PSNR vs image (dB)": evaluate["psnr_prefix_vs_full_image"][i]}
                for i, p in enumerate(evaluate["psnr_prefix"])]
        lines += ["## Nested spectral reconstruction", "", markdown_table(rows)]
    lines += ["## Figures", ""]
    lines += [f"![{name}](figures/{name})" for name in figures if not name.endswith(".gif")]
    if "progression.gif" in figures:
        lines.append("\nCoarse-to-fine generation, animated: [figures/progression.gif](figures/progression.gif)")
    lines += ["", "Stage times (telemetry, not results: they change from run to run) are in `reports/stages.csv`, "
              "`metrics/<stage>.timing.json` and MLflow."]
    return "\n".join(lines) + "\n"


def run(ctx) -> dict:
    params = ctx.params
    metrics_dir = Path(ctx.args.metrics_dir)
    metrics = read_metrics(metrics_dir)
    evaluate = metrics.get("evaluate")
    sweep_file = Path(ctx.args.ablation)
    from spectralar.sweep import read_table

    sweep_table = read_table(sweep_file) if sweep_file.is_file() else None
    tables = {
        "ablation": ablation_table(params.sweeps.get("ablation", {}), vars(params.tokenizer), evaluate, sweep_table),
        "truncation": truncation_table(evaluate or {}, params.tokenizer.num_tokens),
        "correlation": correlation_table(metrics.get("correlation", {})),
        "stages": stage_table(metrics_dir),
    }
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    with atomic_path(out / "figures", directory=True) as tmp:
        histories = {"tokenizer": read_history(Path(ctx.args.tokenizer) / HISTORY),
                     "generator": read_history(Path(ctx.args.generator) / HISTORY)}
        if plot_losses(histories, tmp / "loss_curves.png"):
            figures.append("loss_curves.png")
        for argument, filename, name in FIGURES:
            source = Path(getattr(ctx.args, argument)) / filename
            if source.is_file():
                shutil.copyfile(source, tmp / name)
                figures.append(name)
    for name in ("ablation", "truncation", "correlation", "stages"):
        write_text(out / f"{name}.csv", csv_text(tables[name]))
    write_text(out / "report.md", render(params, metrics, tables, figures))
    for name in ("report.md", "ablation.csv", "truncation.csv", "correlation.csv", "stages.csv", "figures"):
        ctx.tracker.log_artifact(out / name, "report" if name != "figures" else "report/figures")
    finish_pipeline_record(ctx, metrics, out)
    return {"stages_reported": sorted(metrics), "ablation_rows_run": sum(r["source"] != "not run" for r in tables["ablation"]),
            "figures": figures, "sweep_table": str(sweep_file) if sweep_table is not None else None}


def finish_pipeline_record(ctx, metrics: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    """Close this pipeline's MLflow parent run. Stages DVC restored from its run cache never ran and
    never logged: each stage with a metrics file gets a restored child run made from that file,
    unless a run of it with the same params already sits under the parent."""
    from spectralar.stages.context import pipeline_tags, stage_record
    from spectralar.tracking import finish_pipeline

    metrics_dir = Path(ctx.args.metrics_dir)
    records = [stage_record(name, ctx.params, metrics_file=metrics_dir / f"{name}.json") for name in metrics]
    summary = {k: v for k, v in (metrics.get("evaluate") or {}).items() if isinstance(v, (int, float))}
    artifacts = [(out / name, "report") for name in ("report.md", "ablation.csv", "truncation.csv",
                                                     "correlation.csv", "stages.csv")]
    finish_pipeline(ctx.params.tracking, params_file=ctx.params.path, stages=records,
                    artifacts=[*artifacts, (out / "figures", "report/figures")], metrics=summary,
                    tags=pipeline_tags(ctx.params))
