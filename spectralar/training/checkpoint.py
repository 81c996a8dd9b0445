"""Atomic checkpoints, RNG capture for bit-identical resume, and a non-finite loss guard.

The resume contract for a stage (tests/test_training_utils.py::train_tiny is the worked
example):

1. Seed, build model, optimizer and EMA exactly as in a fresh run.
2. If ``latest_checkpoint(dir)`` exists, load model / optimizer / EMA state, then
   :func:`restore_rng_state` *after* construction (construction consumes random numbers).
3. Every K steps save ``{"model", "optimizer", "ema", "step", "rng": capture_rng_state(),
   "config": dataclasses.asdict(config)}`` where ``step`` counts *completed* steps, and the
   loop restarts at ``range(step, total_steps)``.
4. Compute the learning rate from the step (``lr_at``), never from a stateful scheduler.

Checkpoints hold only tensors and plain Python (dict, list, tuple, str, int, float, bool,
None), so they load with ``torch.load(weights_only=True)``: loading a checkpoint cannot
execute code, and a config stored as a dataclass object (which would need pickle) is
rejected when saving rather than when resuming a day later. Each rank draws its own
random numbers: a multi-process stage must store every rank's ``capture_rng_state()``
(e.g. gathered with ``torch.distributed.all_gather_object``) to resume bit-identically.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from spectralar.io import CONTENT_DIGEST, ArtifactError, content_digest, hash_on_open

logger = logging.getLogger("spectralar")

PathLike = Union[str, os.PathLike]

_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


# --------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------


def _check_plain(value: Any, where: str) -> None:
    """Raise if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, (torch.Tensor,) + _PLAIN_SCALARS):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain "
        "Python (store configs as dataclasses.asdict(config), paths as str)"
    )


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: readers see the old file or the new one, never part.

    The bytes go to a hidden temporary file in the same directory (same filesystem, so the
    rename is atomic), are fsynced, and ``os.replace`` moves them into place; the directory
    is fsynced so the rename survives a power cut. On an exception the temporary file is
    removed. A SIGKILL mid-write can leave a ``.<name>.*.tmp`` file behind, but never a
    truncated file at ``path``.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    state = {**state, CONTENT_DIGEST: content_digest(state)}  # torch.load checks no CRC: load_checkpoint does
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    temporary = Path(handle.name)
    try:
        with handle:
            try:
                torch.save(state, handle)
            except RuntimeError as err:  # torch's zip writer reports the file's OSError (a full disk) as its own
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # like every other output (NamedTemporaryFile makes 0600)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, zeroed or foreign bytes: torch's zip/pickle errors vary
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ArtifactError(f"{path}: unreadable ({path.stat().st_size} bytes; {reason})") from err
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: does not hold a dict checkpoint")
    recorded = state.pop(CONTENT_DIGEST, None)  # absent in files of older versions
    if recorded is not None and hash_on_open(path.stat().st_size) and content_digest(state) != recorded:
        raise ArtifactError(f"{path}: content does not match the sha256 it was saved with (a damaged file)")
    return state


# --------------------------------------------------------------------------------------
# Finding and pruning checkpoints
# --------------------------------------------------------------------------------------


def _natural_key(path: Path) -> tuple[tuple[int, ...], str]:
    """Order ``step_9.pt`` before ``step_10.pt`` whether or not numbers are zero-padded."""
    return tuple(int(number) for number in re.findall(r"\d+", path.name)), path.name


def sorted_checkpoints(directory: PathLike, pattern: str = "step_*.pt") -> list[Path]:
    """The checkpoints in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob(pattern) if p.is_file()), key=_natural_key)


def latest_checkpoint(directory: PathLike, pattern: str = "step_*.pt") -> Optional[Path]:
    """The checkpoint with the highest step number in its name, or None if there is none."""
    checkpoints = sorted_checkpoints(directory, pattern)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(directory: PathLike, keep: int, pattern: str = "step_*.pt") -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints matching ``pattern``; return the deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the resume point), got {keep}")
    doomed = sorted_checkpoints(directory, pattern)[:-keep]
    for path in doomed:
        path.unlink()
        logger.debug("pruned checkpoint %s", path)
    return doomed


# --------------------------------------------------------------------------------------
# Random number generator state
# --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Per-step randomness as a function of (seed, step), so a resumed run draws the same values."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if present) all CUDA generator states.

    NumPy's key array is stored as an int64 tensor so the result stays loadable with
    ``weights_only=True``.
    """
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`, so the next random draws repeat exactly."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    _restore_cuda_rng(state.get("cuda"))


def _restore_cuda_rng(cuda_states: Optional[list[torch.Tensor]]) -> None:
    if not cuda_states or not torch.cuda.is_available():
        if cuda_states:
            logger.warning("checkpoint has CUDA RNG states but CUDA is unavailable; skipped")
        return
    available = torch.cuda.device_count()
    if len(cuda_states) != available:
        logger.warning(
            "checkpoint has %d CUDA RNG states, this process sees %d devices",
            len(cuda_states),
            available,
        )
    for index, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)


# --------------------------------------------------------------------------------------
# Non-finite loss guard
# --------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message lists every loss term and the step."""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.numel() == 1:
            return f"{value.item():.6g}"
        bad = int((~torch.isfinite(value)).sum())
        return f"tensor{tuple(value.shape)} with {bad} non-finite"
    return f"{float(value):.6g}"


def check_finite(
    loss: torch.Tensor, step: int, terms: Optional[Mapping[str, Any]] = None
) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` has a NaN or inf.

    ``terms`` (name -> tensor or float) are listed in the message so the culprit is
    visible in the log. Reading the flag synchronises with the GPU; that costs little
    next to a training step, but a stage may call it only on logging steps.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    described = ", ".join(f"{name}={_describe(value)}" for name, value in (terms or {}).items())
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: loss={_describe(loss)}"
        + (f"; terms: {described}" if described else "")
    )
