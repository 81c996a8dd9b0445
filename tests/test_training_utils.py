"""Tests for spectralar.training: optimizer groups, LR schedule, EMA, checkpoints, DDP, meters.

``train_tiny`` below is the resume contract the stage authors follow: build everything as a
fresh run would, then load the latest checkpoint and restore the RNG state, compute the LR
from the step, and save model / optimizer / EMA / step / RNG every K steps.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from spectralar.training import (
    EMA,
    NonFiniteLossError,
    Throughput,
    all_reduce_mean,
    autocast,
    build_adamw,
    capture_rng_state,
    check_finite,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    mfu,
    model_flops_per_sample,
    parameter_groups,
    peak_flops,
    peak_flops_for_name,
    progress,
    prune_checkpoints,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    set_lr,
    transformer_flops_per_token,
)

# ======================================================================================
# optim.py
# ======================================================================================


class _GroupedModel(nn.Module):
    """One parameter of every kind the no-decay rule has to recognise."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(10, 8)  # name contains "embed"/"token"
        self.class_emb = nn.Embedding(3, 8)  # no fragment in the name: caught by type
        self.mask_token = nn.Parameter(torch.randn(1, 1, 8))  # learned token, 3-D
        self.head_scale = nn.Parameter(torch.ones(1, 2, 1, 1))  # per-head scale, vector-like
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_parameter_groups_split_and_order() -> None:
    torch.manual_seed(0)
    model = _GroupedModel()
    groups = parameter_groups(model, weight_decay=0.05)
    assert [group["name"] for group in groups] == ["decay", "no_decay"]
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert groups[0]["param_names"] == ["proj.weight", "head.weight"]
    assert groups[1]["param_names"] == [
        "mask_token",  # a module's own parameters come before its children's
        "head_scale",
        "token_embedding.weight",
        "class_emb.weight",
        "norm.weight",
        "norm.bias",
        "proj.bias",
    ]
    named = dict(model.named_parameters())
    for group in groups:
        assert all(p is named[n] for n, p in zip(group["param_names"], group["params"]))
    # Every trainable parameter exactly once, frozen ones never.
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    # Deterministic: a second call gives the same names in the same order.
    again = parameter_groups(model, weight_decay=0.05)
    assert [g["param_names"] for g in again] == [g["param_names"] for g in groups]


def test_build_adamw_decays_only_the_decay_group() -> None:
    """With zero gradients AdamW's only effect is decoupled decay: p <- p·(1 - lr·wd)."""
    torch.manual_seed(0)
    model = _GroupedModel()
    lr, weight_decay = 0.1, 0.5
    optimizer = build_adamw(model, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = set(parameter_groups(model, weight_decay)[0]["param_names"])
    for name, p in model.named_parameters():
        if name in decayed:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * weight_decay))
        else:
            assert torch.equal(p.detach(), before[name]), name
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="betas"):
        build_adamw(model, lr=lr, betas=(0.9, 1.5), weight_decay=0.0)


_SCHEDULES = [
    dict(base_lr=1e-4, warmup_steps=10, total_steps=100, final_lr=1e-5),
    dict(base_lr=3e-4, warmup_steps=1, total_steps=7, final_lr=0.0),
    dict(base_lr=1e-3, warmup_steps=0, total_steps=50, final_lr=2e-4),
    dict(base_lr=2e-4, warmup_steps=25, total_steps=25, final_lr=1e-5),
]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("config", _SCHEDULES)
def test_lr_schedule_properties(config: dict, schedule: str) -> None:
    base, final = config["base_lr"], config["final_lr"]
    warmup, total = config["warmup_steps"], config["total_steps"]
    lrs = [lr_at(s, schedule=schedule, **config) for s in range(total + 20)]
    assert min(lrs) >= 0.0
    # Warmup rises strictly, starts at base/warmup and reaches base on its last step.
    if warmup:
        assert lrs[0] == pytest.approx(base / warmup)
        assert all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup]))
        assert lrs[warmup - 1] == pytest.approx(base)
    # Continuous at the boundary: the first post-warmup step is base_lr as well.
    if total > warmup:
        assert lrs[warmup] == pytest.approx(base)
    # After warmup the rate never rises and stays within [final, base].
    tail = lrs[warmup:]
    assert all(b <= a + 1e-15 for a, b in zip(tail, tail[1:]))
    expected_end = base if schedule == "constant" else final
    assert all(lr == pytest.approx(expected_end) for lr in lrs[total:])


def test_lr_schedule_shape_against_hand_values() -> None:
    kwargs = dict(base_lr=1.0, warmup_steps=4, total_steps=12, final_lr=0.2)
    assert [lr_at(s, schedule="cosine", **kwargs) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Decay runs over steps 4..12. Halfway (step 8): cosine and linear both at the midpoint.
    assert lr_at(8, schedule="cosine", **kwargs) == pytest.approx(0.6)
    assert lr_at(8, schedule="linear", **kwargs) == pytest.approx(0.6)
    # A quarter of the way (step 6): cosine 0.2 + 0.8·(1 + cos(pi/4))/2, linear 0.2 + 0.8·0.75.
    quarter = 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(6, schedule="cosine", **kwargs) == pytest.approx(quarter)
    assert lr_at(6, schedule="linear", **kwargs) == pytest.approx(0.8)
    assert lr_at(12, schedule="cosine", **kwargs) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, schedule="cosine", base_lr=1.0, warmup_steps=5, total_steps=4, final_lr=0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, schedule="step", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, schedule="cosine", **kwargs)


# ======================================================================================
# ema.py
# ======================================================================================


class _EmaModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.register_buffer("running", torch.zeros(1))
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))

    def set_all(self, value: float) -> None:
        with torch.no_grad():
            self.linear.weight.fill_(value)
            self.linear.bias.fill_(-value)
            self.running.fill_(2 * value)
            self.counter.fill_(int(value))


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_three_steps_match_hand_computation(warmup: bool) -> None:
    model = _EmaModel()
    model.set_all(1.0)
    ema = EMA(model, decay=0.9, warmup=warmup)
    # decay_t = min(0.9, (1 + t)/(10 + t)) -> 0.1, 2/11, 0.25 with warmup; 0.9 without.
    decays = [0.1, 2 / 11, 0.25] if warmup else [0.9, 0.9, 0.9]
    expected = 1.0
    for value, decay in zip([3.0, 5.0, 7.0], decays):
        assert ema.current_decay() == pytest.approx(decay)
        model.set_all(value)
        ema.update(model)
        expected = decay * expected + (1 - decay) * value
        torch.testing.assert_close(ema.shadow["linear.weight"], torch.full((1, 2), expected))
        torch.testing.assert_close(ema.shadow["linear.bias"], torch.full((1,), -expected))
        torch.testing.assert_close(ema.shadow["running"], torch.full((1,), 2 * expected))
        assert int(ema.shadow["counter"]) == int(value)  # integer buffers are copied
    assert ema.num_updates == 3


def test_ema_float32_shadow_copy_to_and_swapped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped(model):
            for k, v in model.state_dict().items():
                assert torch.equal(v, training[k])  # EMA weights (= the initial ones)
            raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, moved[k])  # restored despite the exception
    ema.copy_to(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k]) and v.dtype == torch.bfloat16


def test_ema_state_dict_round_trip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _EmaModel()
    ema = EMA(model, decay=0.99, warmup=True)
    model.set_all(4.0)
    ema.update(model)
    save_checkpoint(tmp_path / "ema.pt", {"ema": ema.state_dict()})
    restored = EMA(_EmaModel(), decay=0.5)
    restored.load_state_dict(load_checkpoint(tmp_path / "ema.pt")["ema"])
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.99, True, 1)
    for name, tensor in ema.shadow.items():
        assert torch.equal(restored.shadow[name], tensor)
    with pytest.raises(ValueError, match="missing"):
        ema.update(nn.Linear(2, 1))


# ======================================================================================
# checkpoint.py: files
# ======================================================================================


def test_save_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "step_1.pt"
    save_checkpoint(path, {"weights": torch.arange(4)})
    original = path.read_bytes()

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial checkpoint bytes")  # part of the file, then the crash
        handle.flush()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"weights": torch.arange(8)})
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(4))
    # A successful save replaces the file.
    save_checkpoint(path, {"weights": torch.arange(8)})
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(8))


def test_save_rejects_objects_that_need_pickle(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True)
    class Config:
        width: int = 8

    with pytest.raises(TypeError, match=r"state\['config'\] is a Config"):
        save_checkpoint(tmp_path / "a.pt", {"config": Config()})
    with pytest.raises(TypeError, match="PosixPath|WindowsPath"):
        save_checkpoint(tmp_path / "b.pt", {"paths": [tmp_path]})
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(tmp_path / "c.pt", {"config": dataclasses.asdict(Config())})
    assert load_checkpoint(tmp_path / "c.pt") == {"config": {"width": 8}}


def test_latest_and_prune_use_numeric_order(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (9, 10, 100, 2):
        save_checkpoint(tmp_path / f"step_{step}.pt", {"step": step})
    (tmp_path / ".step_200.pt.abc.tmp").write_bytes(b"left by a killed writer")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_100.pt"
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_2.pt", "step_9.pt"]
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_10.pt", "step_100.pt"]
    assert (tmp_path / "notes.txt").exists()
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


# ======================================================================================
# checkpoint.py: RNG and the non-finite guard
# ======================================================================================


def _draw() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        tuple(np.random.rand(3)),
        np.random.normal(),  # leaves a cached Gaussian in NumPy's legacy state
        tuple(torch.rand(3).tolist()),
        tuple(torch.randn(2).tolist()),
    )


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    seed_everything(123)
    _draw()
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    first = _draw()
    second = _draw()
    assert first != second
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == first
    assert _draw() == second


def test_check_finite_lists_terms_and_step() -> None:
    check_finite(torch.tensor(1.5), step=3, terms={"l2": torch.tensor(1.5)})
    with pytest.raises(NonFiniteLossError) as info:
        check_finite(
            torch.tensor(float("nan")),
            step=1234,
            terms={"l2": torch.tensor(0.25), "vq": torch.tensor(float("inf")), "gan": 0.0},
        )
    message = str(info.value)
    assert "step 1234" in message
    assert "l2=0.25" in message and "vq=inf" in message and "gan=0" in message
    assert isinstance(info.value, RuntimeError)


# ======================================================================================
# The resume contract: 20 steps straight == 12 steps, "kill", resume from step 10 to 20
# ======================================================================================

TOTAL_STEPS = 20
CHECKPOINT_EVERY = 5


class _TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.net(x_BD)  # (B, 1)


def train_tiny(run_dir: Path, stop_after: int, restore_rng: bool = True):
    """A complete, resumable training loop; stops (as if killed) after ``stop_after`` steps."""
    seed_everything(0)
    model = _TinyMLP()
    optimizer = build_adamw(model, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4)
    ema = EMA(model, decay=0.9, warmup=True)
    start_step = 0
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        if restore_rng:
            restore_rng_state(state["rng"])  # after construction, which drew numbers
        start_step = state["step"]

    for step in range(start_step, min(stop_after, TOTAL_STEPS)):
        lr = lr_at(step, base_lr=1e-2, warmup_steps=4, total_steps=TOTAL_STEPS,
                   schedule="cosine", final_lr=1e-3)
        set_lr(optimizer, lr)
        x_BD = torch.randn(8, 6)  # data drawn from the global RNG, like a shuffling sampler
        y_B1 = x_BD.sum(dim=1, keepdim=True).sin()
        loss = nn.functional.mse_loss(model(x_BD), y_B1)
        check_finite(loss, step, {"mse": loss})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        completed = step + 1
        if completed % CHECKPOINT_EVERY == 0:
            save_checkpoint(
                run_dir / f"step_{completed:07d}.pt",
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict(),
                    "step": completed,
                    "rng": capture_rng_state(),
                },
            )
            prune_checkpoints(run_dir, keep=2)
    return model, optimizer, ema


def _assert_identical(a, b) -> None:
    (model_a, optimizer_a, ema_a), (model_b, optimizer_b, ema_b) = a, b
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name
    for name, shadow in ema_a.shadow.items():
        assert torch.equal(shadow, ema_b.shadow[name]), name
    state_a, state_b = optimizer_a.state_dict()["state"], optimizer_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key]), (index, key)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = train_tiny(tmp_path / "straight", stop_after=TOTAL_STEPS)
    train_tiny(tmp_path / "resumed", stop_after=12)  # killed after step 12
    assert latest_checkpoint(tmp_path / "resumed").name == "step_0000010.pt"
    resumed = train_tiny(tmp_path / "resumed", stop_after=TOTAL_STEPS)
    _assert_identical(straight, resumed)
    assert [p.name for p in sorted((tmp_path / "resumed").iterdir())] == [
        "step_0000015.pt", "step_0000020.pt"
    ]


def test_resume_without_rng_restore_diverges(tmp_path: Path) -> None:
    """Negative control: the bit-identity above really depends on the RNG state."""
    straight = train_tiny(tmp_path / "straight", stop_after=TOTAL_STEPS)
    train_tiny(tmp_path / "resumed", stop_after=12)
    resumed = train_tiny(tmp_path / "resumed", stop_after=TOTAL_STEPS, restore_rng=False)
    with pytest.raises(AssertionError):
        _assert_identical(straight, resumed)


# ======================================================================================
# distributed.py
# ======================================================================================

_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_single_process_fallback(monkeypatch) -> None:
    for name in _TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    context = init_distributed(device_preference="cpu")
    assert (context.rank, context.local_rank, context.world_size) == (0, 0, 1)
    assert context.is_main and not context.is_distributed
    assert context.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    value = torch.tensor([1.0, 3.0])
    assert torch.equal(all_reduce_mean(value), value)
    with pytest.raises(ValueError, match="tensor"):
        all_reduce_mean(torch.tensor([1, 2]))


@pytest.mark.cuda  # its bf16 half runs only with a GPU
def test_resolve_device_and_autocast() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device_preference"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
    with autocast("cpu", enabled=True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    if torch.cuda.is_available():
        with autocast("cuda", enabled=True):
            a = torch.ones(2, 2, device="cuda")
            assert (a @ a).dtype == torch.bfloat16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    """One torchrun-like process: env vars as torchrun sets them, then the checks."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    from spectralar.training import cleanup

    context = init_distributed(device_preference="cpu")
    try:
        assert (context.rank, context.world_size, context.is_main) == (rank, 2, rank == 0)
        mean = all_reduce_mean(torch.tensor([float(rank), 10.0 * rank], dtype=torch.float64))
        assert torch.equal(mean, torch.tensor([0.5, 5.0], dtype=torch.float64))

        torch.manual_seed(0)  # same init and same global batch on both ranks
        reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
        x_BD = torch.randn(8, 5, dtype=torch.float64)
        y_B1 = torch.randn(8, 1, dtype=torch.float64)
        ddp = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
        )
        ddp.module.load_state_dict(reference.state_dict())
        local = slice(4 * rank, 4 * rank + 4)
        nn.functional.mse_loss(ddp(x_BD[local]), y_B1[local]).backward()
        nn.functional.mse_loss(reference(x_BD), y_B1).backward()
        for p_ddp, p_ref in zip(ddp.parameters(), reference.parameters()):
            torch.testing.assert_close(p_ddp.grad, p_ref.grad, rtol=1e-12, atol=1e-14)
    finally:
        cleanup()


def test_two_process_gloo_all_reduce_and_ddp_gradients() -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)


# ======================================================================================
# meter.py
# ======================================================================================


def test_flops_arithmetic() -> None:
    # 6·N + 12·L·T·C with N=1e6, L=2, T=64, C=128: 6e6 + 196608.
    assert transformer_flops_per_token(10**6, layers=2, context=64, width=128) == 6e6 + 196608
    assert transformer_flops_per_token(10**6) == 6e6
    assert model_flops_per_sample(10**6, 64, layers=2, width=128) == 64 * (6e6 + 196608)
    assert model_flops_per_sample(1000, 10) == 6e4
    with pytest.raises(ValueError, match="tokens"):
        model_flops_per_sample(1000, -1)


def test_peak_flops_and_mfu() -> None:
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA GeForce GTX 1080") is None
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override=1e12) == 1e12
    # 1e9 FLOPs per image at 4000 images/s on 8 devices of 1e12: 4e12 / 8e12 = 0.5.
    assert mfu(1e9, 4000.0, 1e12, devices=8) == pytest.approx(0.5)
    assert mfu(1e9, 4000.0, None) is None


def test_throughput_over_a_window() -> None:
    now = [0.0]
    meter = Throughput(window=2, clock=lambda: now[0])
    assert meter.rate == 0.0
    for elapsed, count in [(1.0, 100), (1.0, 100), (2.0, 100)]:
        now[0] += elapsed
        meter.update(count)
    # The window holds the last two steps: 200 items in 3 seconds.
    assert meter.rate == pytest.approx(200 / 3)
    assert meter.total == 300
    meter.reset()
    assert meter.rate == 0.0


def test_progress_logs_every_n_steps_without_a_tty(monkeypatch, caplog) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY
    caplog.set_level(logging.INFO, logger="spectralar")
    bar = progress(range(7), total=7, desc="train", log_every=3)
    seen = []
    for step in bar:
        seen.append(step)
        bar.set_postfix(loss=0.5 * step, lr=1e-4)
    assert seen == list(range(7))
    lines = [r.getMessage() for r in caplog.records if r.name == "spectralar"]
    assert len(lines) == 4  # after the first item (a log shows at once that the loop runs), 3, 6 and the last (7)
    assert lines[0].startswith("train 1/7") and "loss=0 " in lines[0] + " "
    assert lines[1].startswith("train 3/7") and "loss=1" in lines[1] and "lr=0.0001" in lines[1]
    assert lines[3].startswith("train 7/7") and "loss=3" in lines[3]
    caplog.clear()
    assert list(progress(range(3), total=3, log_every=1, enabled=False)) == [0, 1, 2]
    assert not [r for r in caplog.records if r.name == "spectralar"]
