"""What several stages share: devices, resumable checkpoints, self-describing model files."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

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
    state = load_checkpoint(path)
    if state.get("kind") != kind:
        raise ValueError(f"{path} holds a {state.get('kind')!r} model, expected {kind!r}")
    return state


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a frozen config dataclass saved with ``dataclasses.asdict`` (lists -> tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def token_omegas(cfg) -> tuple[int, ...]:
    """ω_1..ω_N of a tokenizer config (eq. 9 generalised, or the uniform ablation)."""
    from spectralar.spectral import frequency_schedule

    kind = "nonuniform" if cfg.nonuniform_mapping else "uniform"
    return frequency_schedule(cfg.num_tokens, cfg.image_size, kind)


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
