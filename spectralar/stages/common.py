"""What several stages share: the device, resumable checkpoints. File contracts: ``spectralar.artifacts``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from spectralar.io import ArtifactError
from spectralar.training import (
    capture_rng_state,
    load_checkpoint,
    prune_checkpoints,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
    sorted_checkpoints,
    training_precision,
)

log = logging.getLogger("spectralar.stages")


def stage_device(preference: str) -> torch.device:
    device = resolve_device(preference)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def announce_precision(ctx, device: torch.device, bf16: bool, cpu_bf16) -> str:
    """Log, and tag the stage's MLflow run with, what a trainer's forward passes run in on this machine
    (``cpu_bf16: auto`` differs between CPUs, and with it the results)."""
    precision = training_precision(device, bf16, cpu_bf16)
    ctx.log.info("training in %s on %s (bf16: %s, cpu_bf16: %s)", precision, device, bf16, cpu_bf16)
    ctx.tracker.set_tags({"spectralar.precision": precision})
    return precision


# Raise when the objects a stage checkpoints change layout (2: training histories and renamed
# dead-code counts are checkpointed; 3: the tokenizer's LeCam averages are checkpointed).
CHECKPOINT_FORMAT = 3


class Checkpointer:
    """Periodic training checkpoints that a rerun of the same stage resumes from.

    A checkpoint holds every object's ``state_dict`` plus RNG states and the digest of the
    config it was made with; a checkpoint of another config is ignored (with a warning), so a
    changed parameter never resumes a stale run. Files live outside the stage's declared outputs
    (DVC deletes those before a run), under ``directory``. The digest includes
    :data:`CHECKPOINT_FORMAT`, so a checkpoint whose objects an older version laid out differently
    is ignored too. An unreadable checkpoint is skipped for the next older one.
    """

    def __init__(self, directory: str | Path, digest: str, *, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.digest = f"{digest}:format{CHECKPOINT_FORMAT}"
        self.keep = keep

    def _newest_readable(self) -> Optional[tuple[Path, dict]]:
        """(path, state) of the newest checkpoint that loads; an unreadable one (a truncated or
        zeroed file) is logged and skipped, so one bad file never blocks the stage."""
        for path in reversed(sorted_checkpoints(self.directory)) if self.directory.is_dir() else []:
            try:
                return path, load_checkpoint(path)
            except ArtifactError as err:
                log.warning("skipping checkpoint %s", err)
        return None

    def resume(self, objects: Mapping[str, Any]) -> int:
        """Load the newest readable matching checkpoint into ``objects``; return the step to start at."""
        found = self._newest_readable()
        if found is None:
            if self.directory.is_dir() and any(self.directory.glob("step_*.pt")):
                log.warning("no readable checkpoint in %s: starting from scratch", self.directory)
            return 0
        path, state = found
        if state.get("digest") != self.digest:
            log.warning("ignoring checkpoint %s: made with other params (digest %s, now %s)",
                        path, state.get("digest"), self.digest)
            return 0
        for name, obj in objects.items():
            obj.load_state_dict(state["objects"][name])
        restore_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def peek_step(self) -> int:
        """Step of the newest readable matching checkpoint (0 if none), without loading any object."""
        found = self._newest_readable()
        if found is None:
            return 0
        return int(found[1]["step"]) if found[1].get("digest") == self.digest else 0

    def clear(self) -> None:
        """Drop the checkpoints of a finished run, so a later rerun starts from scratch."""
        if self.directory.is_dir():
            for path in self.directory.glob("step_*.pt"):
                path.unlink()

    def save(self, step: int, objects: Mapping[str, Any]) -> Path:
        state = {
            "digest": self.digest,
            "step": step,
            "objects": {name: obj.state_dict() for name, obj in objects.items()},
            "rng": capture_rng_state(),
        }
        path = save_checkpoint(self.directory / f"step_{step:08d}.pt", state)
        prune_checkpoints(self.directory, self.keep)
        return path
