"""MODEL_CARD.md: a short, human-readable card written beside each trained model file.

A card is a rendering of what the model's folder and its training data already record: the stage's
``config.json`` (the params sections it used and the values it derived), the model file (name,
size, sha256), the data manifest (source, image shape, classes, split sizes) and the metrics the
stage computed before saving. Nothing else goes in, so the card is deterministic: the same inputs
give the same bytes, and a rerun on the same machine leaves the folder's hash in ``dvc.lock``
unchanged.

What is deliberately left out, and where it lives instead:

- the git commit: a card that named it would change with every commit (a README edit included),
  so a fresh clone of the commit that records ``dvc.lock`` could never reproduce the folder that
  lock pins. The code version is the ``spectralar.git_commit`` tag of the stage's MLflow run
  (``spectralar.tracking``), which records ``-dirty`` for an uncommitted tree as well;
- dates and timings (``*_seconds``, ``*_per_second``, MFU, ...): telemetry, in
  ``metrics/<stage>.timing.json`` and MLflow;
- the params file's path (machine-specific; it is in ``config.json``).

Usage, inside the stage's ``atomic_path`` block, after the model file and ``config.json`` are
written (``data``: the prepared dataset, or the token dump a generator trains on)::

    write_model_card(tmp, GENERATOR_FILE, metrics, data=ctx.args.tokens)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from spectralar.data.shards import MANIFEST
from spectralar.io import read_json, read_manifest, sha256_file, split_telemetry, write_text

MODEL_CARD = "MODEL_CARD.md"
CONFIG = "config.json"  # the stage's resolved config (spectralar.stages.context.StageContext.write_config)

# What each training stage's model is, and how to load it back.
MODELS = {
    "train_proxy": (
        "Proxy VQ model",
        "A convolutional VQ autoencoder in MaskGIT-VQGAN's layout. Its codes supervise tokenizer stage 1 "
        "(TiTok's proxy codes) and its decoder turns the tokenizer's code logits into pixels.",
        'spectralar.artifacts.load_proxy("<this folder>/proxy.pt", "cpu")',
    ),
    "train_tokenizer": (
        "Nested Spectral Tokenizer",
        "Turns an image into an ordered sequence of N spectral token ids; the first i ids decode the image "
        "low-passed by the DCT mask ω_i×ω_i (SpectralAR, Huang et al., §3.1-3.2).",
        'spectralar.load_codec("<this folder>")',
    ),
    "train_generator": (
        "Spectral autoregressive generator",
        "A class-conditional transformer (VAR's blocks) that predicts the tokenizer's N ids one group at a "
        "time, coarse to fine (SpectralAR §3.3); decode its ids with the tokenizer it was trained on.",
        'spectralar.load_generator("<this folder>")',
    ),
}


def write_model_card(directory: str | Path, model_file: str, metrics: Mapping[str, Any], data: str | Path) -> Path:
    """Write ``directory/MODEL_CARD.md`` for ``directory/model_file``; return its path.

    ``directory`` must already hold the model file and the stage's ``config.json``; ``data`` is the
    folder of the data manifest the model trained on (a prepared dataset or a token dump).
    Telemetry keys of ``metrics`` are dropped, so timings never change the card.
    """
    directory = Path(directory)
    config_path, model_path = directory / CONFIG, directory / model_file
    for path in (config_path, model_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: write the model file and config.json before the model card")
    card = render_model_card(read_json(config_path), model_path.name, sha256_file(model_path),
                             model_path.stat().st_size, read_manifest(Path(data) / MANIFEST), metrics)
    write_text(directory / MODEL_CARD, card)
    return directory / MODEL_CARD


def render_model_card(config: Mapping[str, Any], model_name: str, model_sha256: str, model_bytes: int,
                      data_manifest: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The card's Markdown from plain values (no file access: the same values give the same text)."""
    stage = str(config["stage"])
    title, summary, loader = MODELS.get(stage, (model_name, f"A model trained by the {stage} stage.", ""))
    data = describe_data(data_manifest)
    results, _ = split_telemetry(dict(metrics))
    lines = [
        f"# Model card: {title}",
        "",
        f"`{model_name}`, written by the `{stage}` stage of the SpectralAR reproduction pipeline "
        "(SpectralAR: Spectral Autoregressive Visual Generation, Huang et al.; the authors released no "
        "weights). Written with the model; it holds only values a rerun on the same machine reproduces.",
        "",
        "## Model",
        "",
        summary,
        "",
        f"- file: `{model_name}`, {model_bytes} bytes, sha256 `{model_sha256}`",
        *([f"- load: `{loader}`"] if loader else []),
        *[f"- {key}: {_value(value)}" for key, value in sorted(config.get("derived", {}).items())],
        "",
        "## Data",
        "",
        *data,
        "",
        "## Training parameters",
        "",
        "The `params.yaml` sections the stage read; the values it took from its data and upstream models "
        "(image size, N, vocabulary, ...) are listed under Model.",
        "",
        "```yaml",
        yaml.dump(dict(config.get("params", {})), Dumper=_ParamsDumper, sort_keys=True, width=100).rstrip(),
        "```",
        "",
        "## Metrics at save time",
        "",
        *(_metrics_table(results) if results else ["(none)"]),
        "",
        "## Provenance and limits",
        "",
        "- Code version: not in this card, so that the same code and data give the same bytes in every "
        "commit (`dvc.lock` pins this file); it is the `spectralar.git_commit` tag of the stage's MLflow run.",
        f"- Rebuild: `dvc repro {stage}` or `snakemake --cores 2 -f <this folder>`.",
        "- A research reproduction, not the paper's weights or numbers. It expects images like its "
        "training data (shape and classes under Data); anything else is outside what it was trained on.",
        "",
    ]
    return "\n".join(lines)


class _ParamsDumper(yaml.SafeDumper):
    """Block mappings, one key a line; lists inline (``betas: [0.9, 0.95]``)."""


_ParamsDumper.add_representer(
    list, lambda dumper, items: dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=True))


def describe_data(manifest: Mapping[str, Any]) -> list[str]:
    """Markdown lines for a prepared dataset's manifest or a token dump's manifest."""
    height, width, channels = manifest["image_shape"]
    classes = manifest.get("class_names", [])
    shape = f"{height}x{width}, {channels} channel(s), {len(classes)} classes"
    if "tokenizer_sha256" in manifest:  # dump_tokens: the generator's data
        splits = ", ".join(f"{split} {count}" for split, count in sorted(manifest["images"].items()))
        return [
            f"- token dump of the prepared images ({shape}): {manifest['num_tokens']} ids per image, "
            f"vocabulary {manifest['vocab']}",
            f"- images per split: {splits}",
            f"- tokenizer: sha256 `{manifest['tokenizer_sha256']}` (its own card names the source data)",
        ]
    splits = ", ".join(f"{split} {entry['count']}" for split, entry in sorted(manifest["splits"].items()))
    sources = manifest.get("sources", {})
    return [
        f"- source: `{manifest['source']}`, prepared at {shape}",
        f"- images per split: {splits}; skipped files: {len(manifest.get('skipped', []))}",
        *[f"- raw input `{name}`: {_value(value)}" for name, value in sorted(sources.items())],  # sha256 or root
    ]


def _metrics_table(results: Mapping[str, Any]) -> list[str]:
    rows = [f"| {key} | {_value(value)} |" for key, value in sorted(results.items())]
    return ["| metric | value |", "|---|---|", *rows]


def _value(value: Any) -> str:
    """A metric or config value in one cell: floats as Python writes them (shortest exact), lists joined."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(item) for item in value)
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_value(item)}" for key, item in sorted(value.items()))
    if value is None:
        return "n/a"
    return str(value)
