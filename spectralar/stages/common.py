"""What several stages share: the device, resumable checkpoints. File contracts: ``spectralar.artifacts``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from spectralar.training import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
)

log = logging.getLogger("spectralar.stages")


def stage_device(preference: str) -> torch.device:
    device = resolve_device(preference)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


class Checkpointer:
    """Periodic training checkpoints that a rerun of the same stage resumes from.

    A checkpoint holds every object's ``state_dict`` plus RNG states and the digest of the
    config it was made with; a checkpoint of another config is ignored (with a warning), so a
    changed parameter never resumes a stale run. Files live outside the stage's declared outputs
    (DVC deletes those before a run), under ``directory``.
    """

    def __init__(self, directory: str | Path, digest: str, *, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.digest = digest
        self.keep = keep

    def resume(self, objects: Mapping[str, Any]) -> int:
        """Load the newest matching checkpoint into ``objects``; return the step to start at."""
        path = latest_checkpoint(self.directory) if self.directory.is_dir() else None
        if path is None:
            return 0
        state = load_checkpoint(path)
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
        """Step of the newest matching checkpoint (0 if none), without loading any object."""
        path = latest_checkpoint(self.directory) if self.directory.is_dir() else None
        if path is None:
            return 0
        state = load_checkpoint(path)
        return int(state["step"]) if state.get("digest") == self.digest else 0

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
