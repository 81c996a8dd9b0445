"""report: one Markdown page of the pipeline's results beside the paper's, and the pipeline's MLflow record.

Reads only files other stages wrote (their metrics JSON is the source of truth) and writes
``reports/report.md`` with ``reports/ablation.csv`` (Table 4), ``reports/truncation.csv`` (Table 3),
``reports/correlation.csv`` (Table 1), ``reports/stages.csv`` (seconds per stage: telemetry, untracked) and
``reports/figures/`` (sample grid, coarse-to-fine progression and its GIF, spectrum completion,
super-resolution, tokenizer prefixes, loss curves, Figure 4).

Table 4's runs come from ``runs/ablation/table.csv`` when a sweep wrote it (``snakemake ablation``, or
``python -m spectralar.sweep collect ablation`` after the DVC experiments), one line per (row, seed);
this pipeline's own metrics are one more run of its row at its seed. Each row gets its per-seed lines
and a mean ± sample-std (ddof=1) summary, and the report says which steps of the paper's gFID ordering
hold by a stated rule; Table 1 is averaged over the same seeds. Rows with no run are marked not run.
The paper's numbers are ImageNet-256 with Inception features: they show the protocol and the expected
ordering, not a target for the default.

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
from spectralar.evaluation.quality_table import quality_rows
from spectralar.io import atomic_paths, csv_text, read_json, rerun_hint, timing_file
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


# Table 4's per-run numbers, in column order (spectralar.sweep.run_values names them; fid_minus_rfid is
# computed per run): the report averages each over seeds. fid_drop<k> columns follow fid_minus_rfid.
ABLATION_METRICS = ("fid", "inception_score", "class_accuracy", "rfid", "fid_minus_rfid")
GENERATOR_COLUMNS = ("generator_val_loss", "generator_val_accuracy")
CORRELATION_KEYS = ("r2_t2", "r2_t3", "r2_t4", "average")
PARADIGMS = ("raster", "scale", "spectral")


def _seed(value: Any) -> Optional[int]:
    return None if value in (None, "") else int(value)


def seed_statistics(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample standard deviation with ddof=1, count) of the values present; the std is None
    below two values (one seed has no spread)."""
    import numpy as np

    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(present):
        return None, None, 0
    std = float(present.std(ddof=1)) if len(present) > 1 else None
    return float(present.mean()), std, len(present)


def summary_line(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """``num_seeds``, ``seeds`` (space-separated) and, per metric, its mean and ``<metric>_std`` over ``runs``."""
    line: dict[str, Any] = {"num_seeds": len(runs),
                            "seeds": " ".join(str(r["seed"]) for r in runs if r.get("seed") is not None) or None}
    for name in metrics:
        mean, std, _ = seed_statistics([r.get(name) for r in runs])
        line[name], line[f"{name}_std"] = mean, std
    return line


def _own_run(evaluate: Optional[Mapping[str, Any]], generator: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """This pipeline's Table 4 numbers, named as a sweep table names them."""
    from spectralar.sweep import run_values

    return run_values(evaluate, generator)


def _run_numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """A run's numbers as floats, with the generalisation gap gFID − rFID."""
    numbers = {k: _number(v) for k, v in values.items()
               if k in ABLATION_METRICS + GENERATOR_COLUMNS or k.startswith("fid_drop")}
    fid, rfid = numbers.get("fid"), numbers.get("rfid")
    numbers["fid_minus_rfid"] = fid - rfid if fid is not None and rfid is not None else None
    return numbers


def ablation_table(rows: Mapping[str, Any], tokenizer: Mapping[str, Any],
                   evaluate: Optional[Mapping[str, Any]], sweep_table: Optional[Sequence[Mapping[str, str]]], *,
                   generator: Optional[Mapping[str, Any]] = None, seed: Optional[int] = None) -> list[dict]:
    """Table 4: per row of ``sweeps.ablation`` (its ``seeds`` list aside), one line per seed it ran
    (``kind`` = seed) and then its summary line (``kind`` = mean ± std: mean and sample std, ddof=1,
    of each metric over those seeds, ``num_seeds`` and ``seeds``), each with its switches and the
    paper's gFID / IS.

    Runs come from the sweep table (one line per row and seed); this pipeline's own metrics count as
    one more run of the row whose switches equal its tokenizer's, at its own ``seed``, unless the
    sweep table already holds that run. A row with no run is marked not run.
    """
    by_row: dict[str, list[dict]] = {}
    for line in sweep_table or []:
        if line.get("fid") not in (None, ""):
            by_row.setdefault(line["row"], []).append({"seed": _seed(line.get("seed")), "source": "sweep",
                                                      **_run_numbers(line)})
    own = tuple(bool(tokenizer[s]) for s in SWITCHES)
    # A sweep with a common schedule (sweeps.ablation.schedule: e.g. shorter training for every row)
    # runs at other settings than this pipeline, whose numbers then belong to no row.
    comparable = not rows.get("schedule")
    table = []
    for row, overrides in rows.items():
        if row in ("seeds", "schedule"):  # sweeps.ablation.seeds / .schedule: the seed list, the common overrides
            continue
        switches = tuple(_bool(overrides.get(f"tokenizer.{s}", tokenizer[s])) for s in SWITCHES)
        runs = list(by_row.get(row, []))
        if (comparable and switches == own and evaluate is not None
                and all(r["seed"] != seed or seed is None for r in runs)):
            runs.append({"seed": seed, "source": "this pipeline", **_run_numbers(_own_run(evaluate, generator))})
        runs.sort(key=lambda r: (r["seed"] is None, r["seed"] or 0))
        drops = sorted({k for r in runs for k in r if k.startswith("fid_drop")}, key=lambda k: int(k[8:]))
        metrics = [*ABLATION_METRICS, *drops, *GENERATOR_COLUMNS]
        paper = PAPER_TABLE4.get(switches)
        head = {"row": row, **dict(zip(SWITCHES, switches))}
        tail = {"paper_fid": paper[0] if paper else None, "paper_inception_score": paper[1] if paper else None}
        for run in runs:
            table.append({**head, "kind": "seed", "seed": run["seed"], "num_seeds": 1, "seeds": run["seed"],
                          **{name: run.get(name) for name in metrics}, "source": run["source"], **tail})
        sources = sorted({r["source"] for r in runs}, reverse=True)
        summary = summary_line(runs, metrics)
        table.append({**head, "kind": "mean ± std", "seed": None, **summary,
                      "source": " + ".join(sources) if sources else "not run", **tail})
    return _same_columns(table)


def _same_columns(lines: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every line with every column (in first-seen order, ``<metric>_std`` after its metric; the
    paper's columns and ``source`` last), so that the CSV has one header."""
    names: list[str] = []
    for line in lines:
        names += [name for name in line if name not in names]
    last = [n for n in ("source", "paper_fid", "paper_inception_score") if n in names]
    stats = [n for n in names if n not in last and not n.endswith("_std")]
    ordered = []
    for name in stats:
        ordered.append(name)
        if f"{name}_std" in names:
            ordered.append(f"{name}_std")
    ordered += last + [n for n in names if n not in ordered and n not in last]
    return [{name: line.get(name) for name in ordered} for line in lines]


def summaries(table: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [line for line in table if line.get("kind") == "mean ± std"]


def ordering_verdicts(lines: Sequence[Mapping[str, Any]], key: str, metric: str, claimed: Sequence[str],
                      lower_is_better: bool) -> list[dict]:
    """Does the claimed ordering hold? For each neighbouring pair (a, b) of ``claimed`` (worst first):
    b is better than a when its mean is better by more than std_a + std_b (the mean ± std intervals do
    not overlap); worse when it is worse by more than that; else unresolved. With one seed a row has
    no spread and the pair is not judged. A descriptive rule over a few seeds, not a significance test."""
    found = {line[key]: line for line in lines}
    verdicts = []
    for a, b in zip(claimed, claimed[1:]):
        first, second = found.get(a), found.get(b)
        if first is None or second is None or first.get(metric) is None or second.get(metric) is None:
            verdicts.append({"pair": f"{a} → {b}", "difference": None, "spread": None, "verdict": "not run"})
            continue
        gain = (first[metric] - second[metric]) * (1 if lower_is_better else -1)  # > 0: b is better
        spread = (first.get(f"{metric}_std"), second.get(f"{metric}_std"))
        if None in spread:
            verdict, margin = "one seed: not judged", None
        else:
            margin = spread[0] + spread[1]
            verdict = "holds" if gain > margin else "reversed" if -gain > margin else "unresolved (|Δ| ≤ std sum)"
        verdicts.append({"pair": f"{a} → {b}", "difference": second[metric] - first[metric], "spread": margin,
                         "verdict": verdict})
    return verdicts


def paper_fid_order(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rows with a paper gFID, worst (highest) first: the paper's claimed ordering."""
    lines = [line for line in summaries(table) if line.get("paper_fid") is not None]
    return [line["row"] for line in sorted(lines, key=lambda line: -line["paper_fid"])]


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


def correlation_table(correlation: Mapping[str, Any], *, seed: Optional[int] = None,
                      sweep_table: Optional[Sequence[Mapping[str, str]]] = None) -> list[dict]:
    """Table 1 over seeds: per paradigm, one line per seed (``kind`` = seed) and a summary line (mean
    and sample std, ddof=1, of each R² over the seeds), beside the paper's.

    This pipeline's correlation metrics are seed ``seed``; a sweep with seeds adds the others (its
    lines carry ``r2_<paradigm>_<key>``, the same for every row of a seed: the correlation stage reads
    the images, never a tokenizer, so only run.seed, which draws its fit/held-out split, changes it)."""
    per_seed: dict[Optional[int], Mapping[str, Any]] = {}
    if any(isinstance(correlation.get(p), Mapping) for p in PARADIGMS):
        per_seed[seed] = correlation
    for line in sweep_table or []:
        found = _seed(line.get("seed"))
        if found in per_seed or line.get("r2_spectral_average") in (None, ""):
            continue
        per_seed[found] = {p: {k: _number(line.get(f"r2_{p}_{k.removeprefix('r2_')}")) for k in CORRELATION_KEYS}
                           for p in PARADIGMS if line.get(f"r2_{p}_average") not in (None, "")}
    order = sorted(per_seed, key=lambda s: (s is None, s or 0))
    paper = correlation.get("paper_table1", {})
    table = []
    for paradigm in PARADIGMS:
        runs = [{"seed": s, **per_seed[s][paradigm]} for s in order if isinstance(per_seed[s].get(paradigm), Mapping)]
        if not runs:
            continue
        tail = {f"paper_{k}": paper.get(paradigm, {}).get(k) for k in CORRELATION_KEYS}
        for run in runs:
            table.append({"paradigm": paradigm, "kind": "seed", "seed": run["seed"], "num_seeds": 1,
                          "seeds": run["seed"], **{k: run.get(k) for k in CORRELATION_KEYS}, **tail})
        table.append({"paradigm": paradigm, "kind": "mean ± std", "seed": None,
                      **summary_line(runs, CORRELATION_KEYS), **tail})
    return _same_columns(table)


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

# One panel per quantity: (history, stage-1/2 phase of the tokenizer or None, column, title, y label).
# The tokenizer's two stages minimise different things (cross-entropy of proxy codes, then pixel L2),
# so they never share an axis: drawn as one curve they showed a cliff that is only a change of units.
LOSS_PANELS = (
    ("tokenizer", 1.0, "ce", "tokenizer stage 1: proxy codes", "cross-entropy (nats)"),
    ("tokenizer", 2.0, "l2", "tokenizer stage 2: pixels", "L2 to the band-limited target"),
    ("generator", None, "loss", "generator: next token", "cross-entropy (nats)"),
    ("generator", None, "accuracy", "generator: next token", "accuracy"),
)


def _curve(rows: list[dict[str, float]], column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold ``column`` (a sparse column, such as a validation
    measure logged every few steps, is blank elsewhere)."""
    kept = [row for row in rows if column in row]
    return [row["step"] for row in kept], [row[column] for row in kept]


def loss_panels(histories: Mapping[str, list[dict[str, float]]]) -> list[tuple[str, list[dict], str, str]]:
    """The :data:`LOSS_PANELS` the histories can fill: (title, rows, column, y label)."""
    panels = []
    for name, phase, column, title, ylabel in LOSS_PANELS:
        rows = [row for row in histories.get(name, []) if phase is None or row.get("phase", 1.0) == phase]
        if any(column in row for row in rows):
            panels.append((title, rows, column, ylabel))
    return panels


def plot_losses(histories: Mapping[str, list[dict[str, float]]], path: Path) -> bool:
    """Training curves against step, one panel per quantity (:data:`LOSS_PANELS`), with the
    validation curve (``val_<column>``) where the history has one; False when there is nothing to
    plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = loss_panels(histories)
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, rows, column, ylabel) in zip(axes[0], panels):
        ax.plot(*_curve(rows, column), marker=".", label="train")
        if any(f"val_{column}" in row for row in rows):
            ax.plot(*_curve(rows, f"val_{column}"), marker="o", linestyle="--", label="validation")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: same curves, same bytes
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------

def read_metrics(directory: Path) -> dict[str, dict]:
    return {name: read_json(directory / f"{name}.json", rerun_hint(name, directory / f"{name}.json"))
            for name in STAGES if name != "report" and (directory / f"{name}.json").is_file()}


def tokenizer_quality_section(evaluate: Mapping[str, Any], codebook_size: int) -> list[str]:
    """Where the tokenizer's quality goes: each prefix beside the simple codes of its size."""
    summary = evaluate.get("quality_summary") or {}
    lines = ["## Tokenizer quality: nested spectral reconstruction", "",
             f"PSNR (dB, mean over {evaluate.get('psnr_images')} spread val images) of the image decoded from the first "
             "i tokens, against its own target I'_i and against the image; `dct_ceiling` = I'_i against the image (a "
             "prefix that reproduced its target exactly); `pca_equal_bits` = a PCA code with as many 8-bit "
             "coefficients (`pca_components`) as the i tokens have bits; `proxy_ceiling` = the proxy VQ's own "
             "reconstruction of I'_i (the cap of the paper's proxy-code targets). Same numbers as "
             "`python -m spectralar.bench tokenizer-quality`.", ""]
    lines.append(markdown_table(quality_rows(evaluate, codebook_size)))
    facts = [f"codebook usage {evaluate['codebook_usage']:.1%} (perplexity {evaluate['codebook_perplexity']})"
             if "codebook_usage" in evaluate else None,
             f"full code {summary['margin_over_pca_db']:+.2f} dB against the equal-bits PCA code"
             if summary.get("margin_over_pca_db") is not None else None,
             f"largest gap to the DCT ceiling for i ≤ 3N/4: {summary['max_gap_to_dct_ceiling_db']:.2f} dB"
             if summary.get("max_gap_to_dct_ceiling_db") is not None else None,
             f"reconstructions classified correctly {evaluate['reconstruction_class_accuracy']:.1%} "
             f"(originals {evaluate['val_class_accuracy']:.1%}), rFID {evaluate['rfid']:.1f}"
             if "reconstruction_class_accuracy" in evaluate and "val_class_accuracy" in evaluate else None]
    pca = evaluate.get("pca_equal_bits_code")
    if pca:  # the same images through the PCA code of the full code's bits
        facts.append(f"the equal-bits PCA code ({pca['components']} coefficients of {pca['bits']} bits) on the same "
                     f"images: classified correctly {pca['class_accuracy']:.1%}, rFID {pca['rfid']:.1f}")
    return lines + ["", "; ".join(f for f in facts if f) + ".", ""]


def _mean_std(line: Mapping[str, Any], name: str) -> Optional[str]:
    """``mean ± std`` (``mean`` alone for one seed, None when not run)."""
    mean, std = line.get(name), line.get(f"{name}_std")
    if mean is None:
        return None
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


ABLATION_HEADINGS = {"fid": "gFID", "inception_score": "IS", "class_accuracy": "class acc.", "rfid": "rFID",
                     "fid_minus_rfid": "gFID − rFID", "generator_val_loss": "generator val loss",
                     "generator_val_accuracy": "generator val acc."}


def ablation_section(table: Sequence[Mapping[str, Any]], schedule: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Table 4 as mean ± std per row, then which steps of the paper's gFID ordering hold. ``schedule``:
    the sweep's common overrides (``sweeps.ablation.schedule``), stated above the table."""
    lines = summaries(table)
    drops = [n for n in (lines[0] if lines else {}) if n.startswith("fid_drop") and not n.endswith("_std")]
    headings = {**ABLATION_HEADINGS, **{d: f"gFID, last {d[8:]} dropped" for d in drops}}
    metrics = [*ABLATION_METRICS, *drops, *GENERATOR_COLUMNS]
    shown = [{"row": line["row"], **{s: line[s] for s in SWITCHES}, "seeds": line.get("seeds"),
              **{headings[m]: _mean_std(line, m) for m in metrics},
              "paper gFID / IS": f"{line['paper_fid']} / {line['paper_inception_score']}"
              if line.get("paper_fid") is not None else None, "source": line["source"]} for line in lines]
    claimed = paper_fid_order(table)
    verdicts = ordering_verdicts(lines, "row", "fid", claimed, lower_is_better=True)
    holds = bool(verdicts) and all(v["verdict"] == "holds" for v in verdicts)
    return ["## Ablation (Table 4)", "",
            "Per row of `sweeps.ablation`: mean ± sample standard deviation (ddof=1) over the seeds listed "
            "(`sweeps.ablation.seeds`, the same seeds for every row); one seed shows its value alone. "
            "`reports/ablation.csv` holds every (row, seed) line and the summary lines. gFID − rFID is the "
            "generator's share of the gap (per seed, then averaged); `last k dropped` is Table 3's FID from "
            "the first N−k tokens; the generator columns are its validation next-token loss and accuracy. "
            "`source` says where the numbers come from (`snakemake ablation` or the DVC sweep fill in rows "
            "marked not run). Table 1's R² is not per row: the correlation stage reads images, not a "
            "tokenizer (Table 1 below, over the same seeds)." + (
                " Every run uses the sweep's common schedule (`sweeps.ablation.schedule`: "
                + ", ".join(f"`{k}: {v}`" for k, v in schedule.items())
                + "), so its numbers compare with each other, not with this pipeline's." if schedule else ""), "",
            markdown_table(shown),
            f"Paper's claim (gFID, lower is better): {' > '.join(claimed)}. A step holds when the mean gFID "
            "falls by more than the sum of the two rows' standard deviations (their mean ± std intervals do "
            "not overlap), is reversed when it rises by more than that, and is unresolved otherwise; rows "
            "with one seed are not judged. This is a descriptive rule over a few seeds, not a significance "
            f"test. The whole ordering {'holds' if holds else 'does not hold'} by this rule.", "",
            markdown_table([{"step": v["pair"], "Δ mean gFID": v["difference"], "std sum": v["spread"],
                             "verdict": v["verdict"]} for v in verdicts])]


PAPER_TABLE1_ORDER = ("raster", "scale", "spectral")  # the paper's average R², lowest first


def correlation_section(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """Table 1 as mean ± std per paradigm, and whether the paper's ordering of average R² holds."""
    lines = summaries(table)
    shown = [{"paradigm": line["paradigm"], "seeds": line.get("seeds"),
              **{f"R² {k.removeprefix('r2_')}": _mean_std(line, k) for k in CORRELATION_KEYS},
              "paper average": line.get("paper_average")} for line in lines]
    verdicts = ordering_verdicts(lines, "paradigm", "average", PAPER_TABLE1_ORDER, lower_is_better=False)
    return ["## Token correlation (Table 1)", "",
            "Held-out R² of token t_k regressed on t_1..t_{k−1} (protocol in the README): mean ± sample "
            "standard deviation (ddof=1) over the seeds listed. Every seed uses the same images; the seed "
            "draws the fit / held-out split, so the spread is that of the split.", "",
            markdown_table(shown),
            "Paper's claim (average R², higher is better): spectral > scale > raster; same rule as Table 4.", "",
            markdown_table([{"step": v["pair"], "Δ mean R²": v["difference"], "std sum": v["spread"],
                             "verdict": v["verdict"]} for v in verdicts])]


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
        rows = [{"metric": k, "ours": evaluate.get(k), "paper (d16)": paper.get(k)} for k in keys if k in evaluate]
        realism = evaluate.get("realism")
        if realism:  # the same protocol applied to real images and to their reconstructions
            columns = {"real images": "real", "their reconstructions": "reconstructions",
                       "their equal-bits PCA code": "pca_equal_bits"}
            columns = {heading: key for heading, key in columns.items() if key in realism}
            for row in rows:
                row.update({heading: realism[key].get(row["metric"]) for heading, key in columns.items()})
            lines += [f"`real images`: {realism['images']} train images (not among the references) "
                      "scored exactly as the samples are: what real data scores at this sample count (FID's "
                      "small-sample floor; the recall real images reach); `their reconstructions`: the same images "
                      "through the tokenizer (all N tokens), what a generator that produced exactly their tokens "
                      "would score" + ("; `their equal-bits PCA code`: the same images through a PCA code of the "
                                       "tokens' bits (8-bit coefficients), the simple code of the tokenizer's size"
                                       if "pca_equal_bits" in realism else "") + ".", ""]
        lines.append(markdown_table(rows, ["metric", "ours", *columns, "paper (d16)"] if realism else None))
    lines += ablation_section(tables["ablation"], (ctx_params.sweeps.get("ablation") or {}).get("schedule"))
    lines += ["## Truncated generation (Table 3)", "",
              "FID of the same samples decoded from their first N−k tokens; the paper's rows drop k of 64.", "",
              markdown_table(tables["truncation"])]
    lines += correlation_section(tables["correlation"])
    if "psnr_prefix" in evaluate:
        lines += tokenizer_quality_section(evaluate, tokenizer.codebook_size)
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
        "ablation": ablation_table(params.sweeps.get("ablation", {}), vars(params.tokenizer), evaluate, sweep_table,
                                   generator=metrics.get("train_generator"), seed=params.run.seed),
        "truncation": truncation_table(evaluate or {}, params.tokenizer.num_tokens),
        "correlation": correlation_table(metrics.get("correlation", {}), seed=params.run.seed, sweep_table=sweep_table),
        "stages": stage_table(metrics_dir),
    }
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    texts = [f"{name}.csv" for name in ("ablation", "truncation", "correlation", "stages")] + ["report.md"]
    # the page, its tables and its figures are one output: all new or all old, even on a full disk
    with atomic_paths([out / "figures", *(out / name for name in texts)], directories=(out / "figures",)) as tmps:
        histories = {"tokenizer": read_history(Path(ctx.args.tokenizer) / HISTORY),
                     "generator": read_history(Path(ctx.args.generator) / HISTORY)}
        if plot_losses(histories, tmps[0] / "loss_curves.png"):
            figures.append("loss_curves.png")
        for argument, filename, name in FIGURES:
            source = Path(getattr(ctx.args, argument)) / filename
            if source.is_file():
                shutil.copyfile(source, tmps[0] / name)
                figures.append(name)
        for name, tmp in zip(texts, tmps[1:]):
            tmp.write_text(csv_text(tables[name.removesuffix(".csv")]) if name.endswith(".csv")
                           else render(params, metrics, tables, figures))
    for name in ("report.md", "ablation.csv", "truncation.csv", "correlation.csv", "stages.csv", "figures"):
        ctx.tracker.log_artifact(out / name, "report" if name != "figures" else "report/figures")
    finish_pipeline_record(ctx, metrics, out)
    return {"stages_reported": sorted(metrics), "ablation_rows_run": sum(r["source"] != "not run" for r in summaries(tables["ablation"])),
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
