"""Shared fixtures: the repository root, params files with overrides, tiny datasets."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made
# small torch/numpy ops 10-75x slower. Set before torch is imported by any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tracking off for the whole session, module- and session-scoped fixtures included (the per-test
# fixture below cannot reach those); tests that track opt back in with a store of their own.
os.environ["SPECTRALAR_TRACKING"] = "0"


# `make test` hands whole files to two workers (pytest-xdist --dist loadfile --no-loadscope-reorder) in
# collection order. These files take the longest (seconds of one worker, quiet 2-core AVX2 machine,
# 2026-12-02: test_orchestration 863, test_extract_proxy_codes 148, test_fault_injection 129 of 1,691
# in all), so they go first: one worker starts on the longest while the other works through the rest.
# xdist's default order (most tests first) started test_orchestration after ten other files, which
# put the suite's wall time at their time plus its own.
LONGEST_FIRST = ("test_orchestration.py", "test_extract_proxy_codes.py", "test_fault_injection.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _no_tracking_by_default(monkeypatch):
    """Tests do not write to the repository's mlflow.db; tracking tests opt back in."""
    monkeypatch.setenv("SPECTRALAR_TRACKING", "0")


REPO_STORES = ("mlflow.db", "mlartifacts", "mlruns")


def _store_state() -> dict[str, object]:
    """Size and modification time of every file of the repository's MLflow store."""
    state: dict[str, object] = {}
    for name in REPO_STORES:
        path = REPO / name
        for file in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if file.is_file():
                stat = file.stat()
                state[str(file.relative_to(REPO))] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture(autouse=True, scope="session")
def _repository_store_untouched():
    """Guard: the suite fails if any test wrote to the repository's own MLflow store (tests that
    track use a store of their own, under their temporary directory)."""
    before = _store_state()
    yield
    after = _store_state()
    assert after == before, f"the test suite wrote to the repository's MLflow store: {sorted(set(after.items()) ^ set(before.items()))}"


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine more threads only contend.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo() -> Path:
    return REPO


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(path: Path, overrides: dict | None = None) -> Path:
    """params.yaml with ``{"section.key": value}`` overrides, written to ``path``."""
    params = default_params()
    for dotted, value in (overrides or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion_dir(root: Path, n_train: int = 60, n_val: int = 20, seed: int = 0) -> Path:
    """Idx files in Debian's layout with class-dependent synthetic 28x28 images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, label in enumerate(labels):  # a class-dependent bright bar, so classes differ
            images[i, 4 + 2 * label: 8 + 2 * label, 4:24] = 200
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return root


@pytest.fixture
def fashion_dir(tmp_path) -> Path:
    return make_fashion_dir(tmp_path / "fashion")


# A configuration small enough for every stage to run end to end in seconds on 2 cores.
TINY = {
    "proxy.base_channels": 8,
    "proxy.channel_multipliers": [1, 2, 2],
    "proxy.res_blocks": 1,
    "proxy.codebook_size": 32,
    "proxy.code_dim": 8,
    "proxy.norm_groups": 4,
    "train_proxy.steps": 6,
    "train_proxy.batch_size": 16,
    "train_proxy.warmup_steps": 2,
    "train_proxy.checkpoint_every": 3,
    "train_proxy.dead_code_restart_every": 3,
    "train_proxy.log_every": 3,
    "train_proxy.eval_images": 20,
    "tokenizer.width": 32,
    "tokenizer.encoder_depth": 1,
    "tokenizer.decoder_depth": 1,
    "tokenizer.heads": 2,
    "tokenizer.num_tokens": 8,
    "tokenizer.codebook_size": 32,
    "extract_proxy_codes.mode": "precomputed",
    "extract_proxy_codes.batch_size": 16,
    "train_tokenizer.batch_size": 8,
    "train_tokenizer.stage1_steps": 6,
    "train_tokenizer.stage2_steps": 4,
    "train_tokenizer.warmup_steps": 2,
    "train_tokenizer.stage2_warmup_steps": 1,
    "train_tokenizer.checkpoint_every": 3,
    "train_tokenizer.dead_code_restart_every": 2,  # not a divisor of checkpoint_every: counts are checkpointed
    "train_tokenizer.log_every": 2,
    "train_tokenizer.eval_images": 10,
    # p(i) ∝ i, as before the default's floor 4: with the floor, the 6-step tiny run's FID came out the
    # same (4.5e-4) at sample temperatures 0.5 and 1.0, so the DVC sweep test could not see a row's override
    "train_tokenizer.prefix_sampling_floor": 1,
    "train_tokenizer.cpu_bf16": False,  # float32 keeps the tiny runs exact (DDP and resume comparisons);
    "train_generator.cpu_bf16": False,  # tests/test_bf16.py runs the stages in CPU bf16
    "train_tokenizer.adversarial_weight": 0.01,
    "train_tokenizer.adversarial_start_step": 1,
    "train_evalnet.epochs": 1,
    "train_evalnet.batch_size": 16,
    "train_evalnet.width": 4,
    "train_evalnet.feature_dim": 16,
    "reference_stats.num_images": 20,
    "reference_stats.batch_size": 8,
    "correlation.num_images": 20,
    "dump_tokens.batch_size": 16,
    "generator.depth": 1,
    "generator.width": 32,
    "generator.heads": 2,
    "train_generator.batch_size": 8,
    "train_generator.steps": 6,
    "train_generator.warmup_steps": 2,
    "train_generator.checkpoint_every": 3,
    "train_generator.log_every": 2,
    "train_generator.val_images": 10,
    "sample.num_per_class": 2,
    "sample.batch_size": 8,
    "sample.truncate": [0, 2],
    "sample.progression_samples": 2,
    "sample.completion_prefix": 3,
    "sample.superres_samples": 2,
    "evaluate.batch_size": 8,
    "evaluate.reconstruction_images": 10,
    "evaluate.psnr_images": 10,
}
