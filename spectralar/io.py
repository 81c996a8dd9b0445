"""Atomic file output: a stage killed midway never leaves an output that looks complete.

Everything a stage writes goes through ``atomic_path`` (a temporary name in the same directory,
renamed into place only when the write finished) or the helpers built on it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np


TEMPORARY_SUFFIX = ".tmp"


class ArtifactError(ValueError):
    """An input file that is missing a part, truncated, corrupt or of the wrong kind. The message is
    one line: the file, what is wrong, and what to rerun; the CLI prints it without a traceback."""


def temporary_siblings(path: str | Path) -> list[Path]:
    """The temporaries :func:`atomic_path` (and checkpoint saving) make for ``path``:
    ``.<name>.*.tmp`` beside it, files or folders. Left behind only by a killed writer."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}")) if path.parent.is_dir() else []


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries a killed writer of ``path`` left behind; return them.

    Only call this while holding the writer's lock (``spectralar.stages.context.stage_lock``):
    then no live process owns them.
    """
    removed = temporary_siblings(path)
    for stale in removed:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed


def replace_directory(source: str | Path, destination: str | Path) -> None:
    """Move the complete folder ``source`` onto ``destination`` with renames only.

    The old folder is first renamed aside (into a temporary name that the next run's clean-up
    removes), the new one renamed into place, then the old one deleted. At every instant
    ``destination`` is absent, the complete old folder or the complete new folder: never a
    half-deleted one, whatever the moment of a kill.
    """
    source, destination = Path(source), Path(destination)
    aside = None
    if destination.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", suffix=TEMPORARY_SUFFIX,
                                      dir=destination.parent))
        aside.rmdir()
        os.replace(destination, aside)
    os.replace(source, destination)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _flush(tmp: Path, directory: bool) -> None:
    """fsync a finished temporary (a folder: every file in it, then the folder), so that a full disk
    fails here, before any rename, and a renamed output is on disk."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()) if directory else [tmp]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if directory:
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_paths(paths: list[str | Path], *, directories: tuple[str | Path, ...] = ()) -> Iterator[list[Path]]:
    """:func:`atomic_path` for outputs that belong together (a report and its figures): yield one
    temporary per path; if the block succeeds, flush every temporary before the first rename, then
    rename them all into place. A failure while writing or flushing (a full disk included) leaves
    every path as it was; only a kill between the renames, which write nothing, can leave some new
    and some old."""
    paths = [Path(p) for p in paths]
    folders = {Path(d) for d in directories}
    tmps: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path in folders:
                tmps.append(Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)))
            else:
                fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
                os.close(fd)
                tmps.append(Path(name))
        yield list(tmps)
        for path, tmp in zip(paths, tmps):
            _flush(tmp, path in folders)
            os.chmod(tmp, 0o755 if path in folders else 0o644)
        for path, tmp in zip(paths, tmps):
            if path in folders:
                replace_directory(tmp, path)
            else:
                os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` if the block succeeds.

    At every instant ``path`` is absent, the old complete output or the new complete output:
    files are renamed into place, folders swapped in with renames only (:func:`replace_directory`),
    after their contents are flushed to disk.
    """
    with atomic_paths([path], directories=(path,) if directory else ()) as (tmp,):
        yield tmp


def csv_text(rows: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> str:
    """A table of dicts (the first row's keys as columns) as CSV: None -> empty cell, bools as
    true/false (what `dvc exp run -S` and YAML write), everything else as ``str``."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: "" if v is None else str(v).lower() if isinstance(v, bool) else v for k, v in row.items()}
                          for row in rows])
    return buffer.getvalue()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) so reruns are byte-identical."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def rerun_hint(stage: str, output: str | Path) -> str:
    """What remakes ``output`` (a stage's declared output) in either orchestrator. ``-s``: DVC's
    ``-f`` alone would also force every upstream stage, Snakemake's ``-f`` forces only the target."""
    return f"rerun {stage}: `dvc repro -f -s {stage}` or `snakemake -f {output}`"


def _unreadable(path: Path, what: str, err: BaseException, rerun: str) -> ArtifactError:
    """One line: the file, what is wrong with it (with the library's first line), what to rerun."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ArtifactError(f"{path}: {what} ({reason})" + (f"; {rerun}" if rerun else ""))


def read_json(path: str | Path, rerun: str = "") -> Any:
    """A JSON file; one that does not parse (truncated, hand-edited) is an ArtifactError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise _unreadable(path, "not valid JSON", err, rerun) from err


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON, its own digest field left out."""
    body = {key: value for key, value in manifest.items() if key != CONTENT_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()).hexdigest()


def write_manifest(path: str | Path, manifest: dict) -> None:
    """A stage output's manifest.json, carrying the sha256 of its own content (:func:`read_manifest`):
    the shards', tables' and token files' digests it records are then covered too."""
    write_json(path, {**manifest, CONTENT_DIGEST: manifest_digest(manifest)})


def read_manifest(path: str | Path, rerun: str = "") -> dict:
    """A manifest.json, checked against its own sha256: a byte flip that still parses (a count, a
    class name, a recorded checksum) is an ArtifactError naming the file. A manifest without the
    field (written by hand, e.g. in tests) is read unchecked."""
    path = Path(path)
    manifest = read_json(path, rerun)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(manifest).__name__}" + (f"; {rerun}" if rerun else ""))
    recorded = manifest.get(CONTENT_DIGEST)
    if recorded is not None and recorded != manifest_digest(manifest):
        raise ArtifactError(f"{path}: does not match its own sha256 (a damaged or edited manifest)"
                            + (f"; {rerun}" if rerun else ""))
    return {key: value for key, value in manifest.items() if key != CONTENT_DIGEST}


# What numpy raises for a truncated, zeroed or foreign .npy/.npz: a short header or body
# (ValueError "mmap length is greater than file size", EOFError), a zip without its directory, a bad member.
_UNREADABLE_ARRAY = (ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npy(path: str | Path, *, mmap: bool = False, rerun: str = "") -> np.ndarray:
    """An .npy array (memory-mapped read-only when ``mmap``); an unreadable file is an ArtifactError naming it."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except _UNREADABLE_ARRAY as err:
        raise _unreadable(path, "truncated or not an .npy array", err, rerun) from err
    if not isinstance(array, np.ndarray):
        array.close()
        raise ArtifactError(f"{path}: an .npz archive, not an .npy array" + (f"; {rerun}" if rerun else ""))
    return array


@contextlib.contextmanager
def open_npz(path: str | Path, rerun: str = "") -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an .npz; a truncated or corrupt archive, found when it is opened or when the block
    reads a member, is an ArtifactError naming it. The block's own errors pass through unchanged."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except _UNREADABLE_ARRAY as err:
        raise _unreadable(path, "truncated or not an .npz archive", err, rerun) from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ArtifactError(f"{path}: an .npy array, not an .npz archive" + (f"; {rerun}" if rerun else ""))
    with data:
        try:
            yield data
        except (EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise _unreadable(path, "corrupt .npz member", err, rerun) from err


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------
# Integrity between stages
# ------------------------------------------------------------------------------------------------

# Every array file one stage hands to another (image shards, the proxy-code table, token dumps) is
# listed in its manifest with its shape, dtype, size and sha256. Readers always check what costs
# nothing (size, shape, dtype, label ranges); the content hash depends on SPECTRALAR_VERIFY:
#   full  hash everything on open;   fast  never hash;
#   auto  (default) hash an artefact of up to FULL_VERIFY_BYTES, skip larger ones.
# Why auto: on one core of the 2-core development machine, under load, sha256 ran at 950 MB/s in memory
# and ImageShards checked 393 MB of raw 256x256x3 shards at 840-910 MB/s (page cache warm). So the
# default's 61 MB of training shards cost ~70 ms, but ImageNet's 1.28M images would cost ~4.7 min as raw
# shards (252 GB) and ~45 s as JPEG shards (40 GB), plus the disk reads, in every stage and every
# torchrun process that opens them. At that scale run one stage with SPECTRALAR_VERIFY=full after
# copying or moving the data.
VERIFY_VARIABLE = "SPECTRALAR_VERIFY"
FULL_VERIFY_BYTES = 4 << 30


def hash_on_open(size: int) -> bool:
    """Whether a reader hashes an artefact of ``size`` bytes (see :data:`VERIFY_VARIABLE`)."""
    mode = os.environ.get(VERIFY_VARIABLE, "auto").strip() or "auto"
    if mode not in ("auto", "full", "fast"):
        from spectralar.config import ConfigError

        raise ConfigError(f"{VERIFY_VARIABLE} must be auto, full or fast, got {mode!r}")
    return mode == "full" or (mode == "auto" and size <= FULL_VERIFY_BYTES)


# torch.load does not check a model file's zip CRC-32s: one flipped bit in a weight loads silently as
# another weight (measured: torch 2.14, 500.0 read back as 125.0). Model files and checkpoints therefore
# carry this digest of their content, checked on load (training.checkpoint, evaluation.domain).
CONTENT_DIGEST = "content_sha256"


def content_digest(state: Any) -> str:
    """sha256 of a nested state: every tensor's place, dtype, shape and bytes and every plain value."""
    digest = hashlib.sha256()

    def walk(where: str, value: Any) -> None:
        if hasattr(value, "detach") and hasattr(value, "untyped_storage"):  # a torch tensor (no torch import)
            import torch

            tensor = value.detach().cpu().contiguous()
            digest.update(f"{where}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(f"{where}[{key!r}]", value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{where}:{len(value)} items:".encode())
            for index, item in enumerate(value):
                walk(f"{where}[{index}]", item)
        else:
            digest.update(f"{where}={value!r};".encode())

    walk("", state)
    return digest.hexdigest()


def array_record(path: str | Path, array: np.ndarray) -> dict[str, Any]:
    """What a manifest holds about an array file that ``path`` was just written from: shape, dtype,
    size in bytes and the sha256 of the whole file."""
    path = Path(path)
    return {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def check_array(path: str | Path, array: np.ndarray, record: Optional[dict], manifest: str | Path,
                rerun: str) -> None:
    """Check an opened array file against its manifest ``record`` (:func:`array_record`): size, shape
    and dtype always, the sha256 per :func:`hash_on_open`. A mismatch is an ArtifactError naming the
    file, what differs and what to rerun."""
    path = Path(path)
    if record is None:
        raise ArtifactError(f"{path}: {manifest} lists no shape or checksum for it (an output of an older "
                            f"version, or an edited manifest); {rerun}")
    found = {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": path.stat().st_size}
    for key, value in found.items():
        if value != record.get(key):
            raise ArtifactError(f"{path}: {key} {value}, but {manifest} says {record.get(key)}; {rerun}")
    if hash_on_open(found["bytes"]) and sha256_file(path) != record.get("sha256"):
        raise ArtifactError(f"{path}: content does not match the sha256 in {manifest} (a damaged or replaced "
                            f"file); {rerun}")


# ------------------------------------------------------------------------------------------------
# Results and telemetry
# ------------------------------------------------------------------------------------------------

# Timings, throughputs and resume points differ from one run, machine or load to the next: they are
# telemetry, kept out of the metrics files (results a rerun reproduces) and written beside them to
# ``<stage>.timing.json``, which git ignores; MLflow records both.
TELEMETRY = re.compile(r"(_seconds|_per_second|_per_s|_per_second_[a-z_]+|_speedup)$|^mfu$|^resumed_from_")
TIMING_SUFFIX = ".timing.json"


def split_telemetry(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, telemetry) of a stage's metrics."""
    telemetry = {key: value for key, value in metrics.items() if TELEMETRY.search(key)}
    return {key: value for key, value in metrics.items() if key not in telemetry}, telemetry


def timing_file(metrics_file: str | Path) -> Path:
    """``metrics/<stage>.json`` -> ``metrics/<stage>.timing.json``."""
    path = Path(metrics_file)
    return path.with_name(path.name[: -len(path.suffix)] + TIMING_SUFFIX if path.suffix else path.name + TIMING_SUFFIX)
