"""Every file contract between stages: names, model files, tables, token dumps, samples, histories.

A stage writes its artefacts through this module and the next stage reads them back through it, so
no stage module imports another. Model files rebuild themselves (nanoGPT's checkpoints embed their
model config): a file holds its kind, its configs as dicts, the state dicts and plain extras.

Values declared once upstream are read back from these artefacts by the stages downstream (as
nanoGPT's trainer reads ``vocab_size`` from the prepared data's meta file):

  prepared dataset manifest   image size and channels, classes        -> train_proxy, train_tokenizer, ...
  proxy file                  the proxy's codebook size and code grid   -> train_tokenizer
  tokenizer file              N, the vocabulary, ω_1..ω_N               -> dump_tokens, sample, evaluate
  token manifest              N, the vocabulary, classes                -> train_generator
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from spectralar.config import ConfigError
from spectralar.data.shards import MANIFEST
from spectralar.io import ArtifactError, array_record, check_array, open_npz, read_manifest, read_npy, rerun_hint, \
    write_text
from spectralar.training import load_checkpoint, save_checkpoint

# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------

# MANIFEST (manifest.json): the prepared dataset's, the proxy codes', the token dump's
CONFIG = "config.json"            # the resolved config beside every stage's outputs
HISTORY = "history.csv"           # training loss curves
PROXY_FILE = "proxy.pt"
TOKENIZER_FILE = "tokenizer.pt"
GENERATOR_FILE = "generator.pt"
EVALNET_FILE = "evalnet.pt"
PROXY_CODES_TABLE = "train.npy"   # extract_proxy_codes: uint16 (images, levels, h*w)
SAMPLES_FILE = "samples.npz"      # ADM's layout: arr_0 uint8 (N, H, W, C), labels, ids
TRUNCATED_DIR = "truncated"       # samples_drop{k}.npz: the same samples decoded from N-k tokens
TRUNCATED = re.compile(r"samples_drop(\d+)\.npz")
# uint16 holds ids of codebooks up to 65536 entries (TiTok-B64: 4096)
MAX_UINT16_VOCAB = np.iinfo(np.uint16).max + 1


def truncated_name(k: int) -> str:
    return f"samples_drop{k}.npz"


# ------------------------------------------------------------------------------------------------
# Values that flow downstream: model configs completed from the artefacts a stage consumes
# ------------------------------------------------------------------------------------------------

def _complete(section: Any, where: str, source: str, **values: Any) -> Any:
    try:
        return dataclasses.replace(section, **values)
    except (ValueError, TypeError) as err:
        given = ", ".join(f"{k} = {v}" for k, v in values.items())
        raise ConfigError(f"{where}: {err} (with {given} from {source})") from err


def proxy_config_for(section, image_shape: tuple[int, int, int], source: str = "the prepared dataset"):
    """The params' ``proxy`` section completed with the prepared images' size and channels."""
    height, _, channels = image_shape
    return _complete(section, "proxy", source, image_size=height, in_channels=channels)


def tokenizer_config_for(section, image_shape: tuple[int, int, int], proxy_codebook_size: Optional[int] = None,
                         source: str = "the prepared dataset and the proxy file"):
    """The params' ``tokenizer`` section completed with the images' size and channels and (when
    given) the proxy's codebook size, whose codes stage 1 predicts."""
    height, _, channels = image_shape
    values = {"image_size": height, "in_channels": channels}
    if proxy_codebook_size is not None:
        values["proxy_codebook_size"] = proxy_codebook_size
    config = _complete(section, "tokenizer", source, **values)
    try:
        config.omegas  # the ω schedule of N tokens must exist at this image size
    except ValueError as err:
        raise ConfigError(f"tokenizer.num_tokens: {err} (image size {height} from {source})") from err
    return config


def generator_config_for(section, token_manifest: Mapping[str, Any], source: str = "the token dump's manifest"):
    """The params' ``generator`` section completed with N, the vocabulary and the classes of the
    token dump it trains on."""
    return _complete(section, "generator", source, vocab_size=int(token_manifest["vocab"]),
                     num_tokens=int(token_manifest["num_tokens"]), num_classes=int(token_manifest["num_classes"]))


def proxy_code_levels(tokenizer_config) -> tuple[int, ...]:
    """The ω values whose targets stage 1 needs, i.e. the columns of the proxy-code table: all N
    nested levels, or only the full image when spectral supervision is off (plain TiTok, Table 4)."""
    omegas = tokenizer_config.omegas
    return omegas if tokenizer_config.spectral_supervision else (omegas[-1],)


# ------------------------------------------------------------------------------------------------
# Self-describing model files
# ------------------------------------------------------------------------------------------------

def save_model_file(path: str | Path, kind: str, configs: Mapping[str, Any], weights: Mapping[str, dict],
                    extra: Optional[Mapping[str, Any]] = None) -> None:
    """A model file that rebuilds itself: configs (as dicts), state dicts, and plain extras."""
    save_checkpoint(path, {
        "kind": kind,
        "configs": {name: dataclasses.asdict(cfg) for name, cfg in configs.items()},
        "weights": dict(weights),
        "extra": dict(extra or {}),
    })


def load_model_file(path: str | Path, kind: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that makes it first (dvc repro / snakemake)")
    try:
        state = load_checkpoint(path)
    except ArtifactError as err:  # truncated, zeroed, flipped: say what remakes it
        stage = {"proxy": "train_proxy", "tokenizer": "train_tokenizer", "generator": "train_generator"}.get(kind)
        raise ArtifactError(f"{err}; {rerun_hint(stage, path.parent)}" if stage else str(err)) from err
    if state.get("kind") != kind:
        raise ValueError(f"{path} holds a {state.get('kind')!r} model, expected {kind!r}")
    return state


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a frozen config dataclass saved with ``dataclasses.asdict`` (lists -> tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def save_proxy(path: str | Path, model) -> None:
    save_model_file(path, "proxy", {"proxy": model.config}, {"proxy": model.state_dict()})


def load_proxy(path: str | Path, device: torch.device | str):
    """train_proxy's file as a :class:`ProxyVQModel` in eval mode."""
    from spectralar.models.proxy_vq import ProxyConfig, ProxyVQModel

    state = load_model_file(path, "proxy")
    model = ProxyVQModel(config_from_dict(ProxyConfig, state["configs"]["proxy"]))
    model.load_state_dict(state["weights"]["proxy"])
    return model.to(device).eval()


def save_tokenizer(path: str | Path, tokenizer, proxy, omegas, soft: bool) -> None:
    """The trained tokenizer with the proxy whose decoder turns its logits into pixels."""
    save_model_file(path, "tokenizer", {"tokenizer": tokenizer.config, "proxy": proxy.config},
                    {"tokenizer": tokenizer.state_dict(), "proxy": proxy.state_dict()},
                    {"omegas": list(omegas), "soft": soft})


def load_codec(path: str | Path, device: torch.device | str):
    """The trained tokenizer file (train_tokenizer's EMA weights) as a ready :class:`SpectralCodec`.

    The file rebuilds itself: configs "tokenizer" and "proxy", their weights, and the extras
    ``omegas`` (ω_1..ω_N) and ``soft`` (stage-2 soft decoding) that the codec needs.
    """
    from spectralar.models.codec import SpectralCodec
    from spectralar.models.proxy_vq import ProxyConfig, ProxyVQModel
    from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig

    state = load_model_file(path, "tokenizer")
    tokenizer = NestedSpectralTokenizer(config_from_dict(TokenizerConfig, state["configs"]["tokenizer"]))
    tokenizer.load_state_dict(state["weights"]["tokenizer"])
    proxy = ProxyVQModel(config_from_dict(ProxyConfig, state["configs"]["proxy"]))
    proxy.load_state_dict(state["weights"]["proxy"])
    extra = state["extra"]
    codec = SpectralCodec(tokenizer, proxy, tuple(extra["omegas"]), soft=bool(extra["soft"]))
    return codec.to(device).eval()


def save_generator(path: str | Path, model, extra: Mapping[str, Any]) -> None:
    save_model_file(path, "generator", {"generator": model.config}, {"generator": model.state_dict()}, extra)


def load_generator(path: str | Path, device: torch.device | str):
    """(model in eval mode, extras) from a generator.pt written by train_generator."""
    from spectralar.models.generator import GeneratorConfig, SpectralGPT

    state = load_model_file(path, "generator")
    model = SpectralGPT(config_from_dict(GeneratorConfig, state["configs"]["generator"]))
    model.load_state_dict(state["weights"]["generator"])
    return model.to(device).eval(), dict(state["extra"])


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def load_proxy_codes(directory: str | Path) -> tuple[dict, Optional[np.ndarray]]:
    """(manifest, table memmap or None in online mode) of an extract_proxy_codes output, checked
    against the manifest's record of the table (shape, dtype, size, sha256: :func:`check_array`)."""
    rerun = rerun_hint("extract_proxy_codes", directory)
    manifest_path = Path(directory) / MANIFEST
    manifest = read_manifest(manifest_path, rerun)
    if manifest["mode"] == "online":
        return manifest, None
    table = read_npy(Path(directory) / PROXY_CODES_TABLE, mmap=True, rerun=rerun)
    check_array(Path(directory) / PROXY_CODES_TABLE, table, manifest.get("files", {}).get(PROXY_CODES_TABLE),
                manifest_path, rerun)
    return manifest, table


def _labels_name(split: str) -> str:
    return "labels.npy" if split == "train" else f"{split}_labels.npy"


def write_tokens(directory: str | Path, split: str, ids: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """One split of a token dump: ids uint16 (images, N) and labels int64. Returns {file name: record}
    for the manifest's ``files`` (shape, dtype, size, sha256), which :func:`load_tokens` checks."""
    directory = Path(directory)
    records = {}
    for name, array in ((f"{split}.npy", ids), (_labels_name(split), labels.astype(np.int64))):
        np.save(directory / name, array, allow_pickle=False)
        records[name] = array_record(directory / name, array)
    return records


def load_tokens(directory: str | Path, split: str = "train") -> tuple[dict, np.ndarray, np.ndarray]:
    """(manifest, ids (images, N) uint16, labels int64) of one split of a dump_tokens output."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory / MANIFEST} not found: run the dump_tokens stage first")
    rerun = rerun_hint("dump_tokens", directory)
    manifest = read_manifest(directory / MANIFEST, rerun)
    arrays = []
    for name in (f"{split}.npy", _labels_name(split)):
        array = read_npy(directory / name, rerun=rerun)
        check_array(directory / name, array, manifest.get("files", {}).get(name), directory / MANIFEST, rerun)
        arrays.append(array)
    ids, labels = arrays
    return manifest, ids, labels


def write_history(path: str | Path, rows: list[dict]) -> None:
    """Logged training rows as CSV, ``step`` (and ``phase``) first."""
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("step", "phase"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_history(path: str | Path) -> list[dict[str, float]]:
    """A history.csv as rows of floats (empty cells dropped); no rows when the file is absent."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------

def load_samples(path: str | Path, image_shape: tuple[int, int, int],
                 num_classes: int) -> tuple[torch.Tensor, torch.Tensor, Optional[np.ndarray]]:
    """A sample stage .npz as images uint8 (N, C, H, W), labels int64 (N,) and ids (N, n) or None.

    ADM's layout (``arr_0`` uint8 (N, H, W, C)) at the dataset's resolution and channel count, and
    ``labels`` (the classes the samples were asked for) in 0..num_classes-1; anything else is a
    ValueError naming the file.
    """
    from spectralar.evaluation.metrics import validate_samples

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the sample stage first")
    rerun = rerun_hint("sample", path.parent.parent if path.parent.name == TRUNCATED_DIR else path.parent)
    try:
        with open_npz(path, rerun) as data:
            arrays = {key: data[key] for key in data.files}
    except ArtifactError:
        raise
    except (OSError, ValueError) as err:  # a member with a corrupt header
        raise ArtifactError(f"{path}: not a readable .npz ({err}); {rerun}") from err
    missing = [key for key in ("arr_0", "labels") if key not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing} (need arr_0 uint8 (N, H, W, C) and labels (N,)); "
                         f"found {sorted(arrays)}")
    height, width, channels = image_shape
    expected = f"uint8 (N, {height}, {width}, {channels})"
    try:
        images = validate_samples(arrays["arr_0"], layout="nhwc")  # (N, C, H, W)
    except ValueError as err:
        raise ValueError(f"{path}: arr_0 must be {expected}: {err}") from err
    found = (images.shape[2], images.shape[3], images.shape[1])
    if found != tuple(image_shape):
        raise ValueError(f"{path}: arr_0 images are {found[0]}x{found[1]} with {found[2]} channel(s) but the "
                         f"dataset's are {height}x{width} with {channels}: expected {expected}")
    labels = arrays["labels"]
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{path}: labels must be (N,) with N = {len(images)} samples, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1} (the dataset's classes), got "
                         f"{labels.min()}..{labels.max()}")
    return images, torch.from_numpy(labels.astype(np.int64)), arrays.get("ids")


def truncated_files(samples_dir: str | Path) -> dict[int, Path]:
    """{k: samples_drop{k}.npz} for every truncated sample file, by k."""
    directory = Path(samples_dir) / TRUNCATED_DIR
    found = {}
    for path in sorted(directory.glob("samples_drop*.npz")) if directory.is_dir() else []:
        match = TRUNCATED.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))
