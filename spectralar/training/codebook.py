"""Dead-code restarts for vector-quantizer codebooks (Jukebox, Dhariwal et al. 2020; SoundStream).

A code that is never the nearest one gets no gradient (the codebook term of the VQ loss only
moves the chosen codes), so once unused it stays unused: the codebook collapses onto the few
codes that won early. Every ``every`` steps the codes unused since the previous restart are moved
onto encoder outputs of the current batch, where they immediately win some inputs back.

Shared by train_proxy (raw L2 codebook) and train_tokenizer (TiTok's L2-normalised codebook).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


class DeadCodeRestarts:
    """How often each code was chosen since the last restart, and the restart itself.

    A checkpoint object (``state_dict`` / ``load_state_dict``): a resumed run restarts exactly the
    codes an uninterrupted one would, whatever ``every`` is relative to the checkpoint interval.

    Args:
        codebook_size: number of codes K.
        every: restart codes unused for this many steps; 0 = never.
        seed: the run seed; restart ``step`` draws its latents from a generator seeded
            ``seed + step``, so restarts do not depend on (or disturb) any other RNG.
        device: where the code counts live (that of the ids passed to :meth:`observe`).
        until: no restart after this step (1-based); codes that die later stay dead. 0 = restarts
            through the whole run.
    """

    def __init__(self, codebook_size: int, every: int, seed: int,
                 device: Optional[torch.device | str] = None, *, until: int = 0) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if every < 0:
            raise ValueError(f"every must be >= 0 (0 = off), got {every}")
        if until < 0:
            raise ValueError(f"until must be >= 0 (0 = every window), got {until}")
        self.every = every
        self.until = until
        self.seed = seed
        # Times each code was chosen since the last restart (not the codebook_usage metric, a fraction).
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)  # (K,)
        self.restarted = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def observe(self, ids: torch.Tensor) -> None:
        """Count the code ids (any shape) chosen at this step."""
        if self.enabled:
            self.counts += torch.bincount(ids.reshape(-1), minlength=len(self.counts))

    def due(self, step: int) -> bool:
        """True after the last step of every ``every``-step window that ends by step ``until``
        (``step`` is 0-based, ``until`` 1-based)."""
        return self.enabled and (step + 1) % self.every == 0 and (self.until == 0 or step + 1 <= self.until)

    @torch.no_grad()
    def restart(
        self,
        step: int,
        weight: torch.Tensor,
        latents_MD: torch.Tensor,
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        ema_shadow: Optional[torch.Tensor] = None,
        normalized: bool = False,
    ) -> int:
        """Move every code unused since the last restart onto a random row of ``latents_MD``.

        Args:
            step: the 0-based step that just finished (seeds the choice of latents).
            weight: the codebook parameter (K, D), changed in place.
            latents_MD: encoder outputs of this batch (M, D), in the codebook's space.
            optimizer: its Adam moments of the restarted rows are zeroed (a fresh start, not the
                dead code's stale statistics).
            ema_shadow: the EMA's copy of ``weight``; restarted rows are written there too, or the
                saved (EMA) model would average each new code with the dead one it replaced.
            normalized: the quantizer L2-normalises codes before lookup (TiTok). New rows then take
                the latent's direction at the mean norm of the live rows: Adam moves every row by
                about lr per step, so a row's norm sets how fast its direction moves, and a
                restarted row should move like its live neighbours (dead rows keep their tiny init
                norm, unit-norm rows would barely move).

        Returns:
            The number of codes restarted. The counts start again from zero.
        """
        dead_K = self.counts == 0  # (K,)
        count = int(dead_K.sum())
        self.counts.zero_()
        if count == 0:
            return 0
        dead_K = dead_K.to(weight.device)
        generator = torch.Generator().manual_seed(self.seed + step)
        pick = torch.randint(0, len(latents_MD), (count,), generator=generator).to(latents_MD.device)
        rows_CD = latents_MD[pick].float()  # (count, D)
        if normalized:
            live_norm = weight[~dead_K].float().norm(dim=-1).mean() if count < len(weight) else 1.0
            rows_CD = F.normalize(rows_CD, dim=-1) * live_norm
        weight[dead_K] = rows_CD.to(weight)
        if ema_shadow is not None:
            ema_shadow[dead_K.to(ema_shadow.device)] = rows_CD.to(ema_shadow)
        state = optimizer.state.get(weight, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead_K] = 0
        self.restarted += count
        return count

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "restarted": self.restarted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["counts"].shape != self.counts.shape:
            raise ValueError(f"code counts have shape {tuple(state['counts'].shape)}, "
                             f"expected {tuple(self.counts.shape)}")
        self.counts.copy_(state["counts"])
        self.restarted = int(state["restarted"])
