"""train_tokenizer data-parallel: 2 gloo processes == 1 process, per step and in the final weights; a
killed 2-process run resumes bit-identically; each process's share of the batch and its micro-batches."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectralar.artifacts import load_model_file, load_proxy, tokenizer_config_for
from spectralar.cli import build_parser, run_stage
from spectralar.config import ConfigError, load_params
from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from tests.conftest import REPO, TINY, make_fashion_dir, write_params
from tests.test_tokenizer_stages import Project

# proxy-code head (the precomputed table is indexed by each process's slice), dead-code restarts every
# 2 steps, stage 2 with the discriminator and LeCam from its step 1 (TINY); a history row per step
OVERRIDES = {"tokenizer.decoder_head": "proxy_codes", "train_tokenizer.log_every": 1, "run.device": "cpu"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """prepare -> train_proxy -> extract_proxy_codes once for the module (tiny config)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("tokenizer_ddp")
    (base / "p").mkdir()
    project = Project(base / "p", make_fashion_dir(base / "fashion"), OVERRIDES)
    project.run_all(until="extract_proxy_codes")
    return project


def _history(path: Path) -> list[dict]:
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def _weights(path: Path) -> dict:
    return load_model_file(path, "tokenizer")["weights"]


def _argv(project: Project, params: Path, out: str, checkpoints: str, metrics: str) -> list[str]:
    argv = project.argv("train_tokenizer")
    argv[argv.index("--params") + 1] = str(params)
    for flag, value in (("--out", out), ("--checkpoints", checkpoints), ("--metrics", metrics)):
        argv[argv.index(flag) + 1] = str(project.root / value)
    return argv


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _rank_main(rank: int, port: int, argv: list[str], kill_step: int) -> None:
    """One process of a 2-process job: torchrun's environment, then the stage as the CLI runs it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if kill_step:  # every process dies after that step's history row, as the 1-process resume test kills
        import spectralar.stages.train_tokenizer as stage

        original = stage.Trainer._log

        def dies_after_kill_step(self, step, *args):
            original(self, step, *args)
            if step == kill_step:
                raise RuntimeError("killed")

        stage.Trainer._log = dies_after_kill_step
    run_stage("train_tokenizer", build_parser().parse_args(argv))


def _two_processes(argv: list[str], kill_step: int = 0) -> list[int]:
    """Exit codes of the stage run by 2 gloo processes forked from this one (they inherit its imports,
    so they start at once; the torchrun launch through the CLI is tested once, by the resume)."""
    context, port = multiprocessing.get_context("fork"), _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, port, argv, kill_step)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def _params(project: Project, path: Path, **overrides) -> Path:
    fashion = project.root.parent / "fashion"
    return write_params(path, {"data.fashion_mnist_dir": str(fashion), **TINY, **OVERRIDES, **overrides})


def _run_one(project: Project, params: Path, out: str) -> dict:
    """The stage in this process (1 process), outputs under ``out``."""
    argv = _argv(project, params, out, f"ck_{out}", f"{out}.json")
    return run_stage("train_tokenizer", build_parser().parse_args(argv))


def _assert_same_run(root: Path, one: str, two: str, tolerance: float) -> None:
    """Every history value at every step, and every final weight, within ``tolerance``."""
    first, second = _history(root / one / "history.csv"), _history(root / two / "history.csv")
    assert [row["step"] for row in first] == [row["step"] for row in second] == list(range(1, 11))
    for a, b in zip(first, second):
        assert a.keys() == b.keys(), (a, b)
        for name in a:  # loss, ce, vq, grad_norm, lr; stage 2: l2, generator_adv, disc_loss, lecam
            assert abs(a[name] - b[name]) < tolerance, (name, a, b)
    weights, other = _weights(root / one / "tokenizer.pt"), _weights(root / two / "tokenizer.pt")
    for part in ("tokenizer", "proxy"):
        for key, value in weights[part].items():
            assert (value - other[part][key]).abs().max() < tolerance, (part, key)


def test_two_processes_match_one_process(project, tmp_path):
    """Restarts on (TINY), forward passes of 4 images in both runs: the 2 processes gather the code
    counts and restart latents of the whole batch, so they re-seed the codes 1 process re-seeds.

    Equal pass shapes matter here: with other shapes the passes differ by ~1e-7, enough to flip a
    near-tie between two codes that a restart seeded from near-identical latents; Adam, whose moments
    the restart zeroed, then moves those rows by ±lr and the runs part by ~1e-3 (measured).
    """
    one = _params(project, tmp_path / "one.yaml", **{"train_tokenizer.micro_batch_size": 4})
    single = _run_one(project, one, "one")  # 2 passes of 4 images
    assert single["restarted_codes"] > 0  # restarts happened, so their rank consistency is tested
    argv = _argv(project, _params(project, tmp_path / "two.yaml"), "two", "ck_two", "two.json")
    assert _two_processes(argv) == [0, 0]  # 1 pass of 4 images each
    _assert_same_run(project.root, "one", "two", 1e-5)
    metrics = json.loads((project.root / "two.json").read_text())  # rank 0 wrote it, with every result
    assert metrics["world_size"] == 2 and metrics["restarted_codes"] == single["restarted_codes"]


def test_two_processes_accumulating_match_one_pass(project, tmp_path):
    """2 processes x 2 micro-batches of 2 images (DDP syncs at the second) == 8 images in one pass."""
    no_restarts = {"train_tokenizer.dead_code_restart_every": 0}
    _run_one(project, _params(project, tmp_path / "one.yaml", **no_restarts), "one_pass")
    params = _params(project, tmp_path / "two.yaml", **no_restarts, **{"train_tokenizer.micro_batch_size": 2})
    assert _two_processes(_argv(project, params, "accumulated", "ck_accumulated", "accumulated.json")) == [0, 0]
    _assert_same_run(project.root, "one_pass", "accumulated", 1e-5)


def test_killed_two_process_run_resumes_bit_identically(project, tmp_path):
    """Killed after step 4 (checkpoint 3: the restart after step 4 needs step 3's code counts), resumed
    by the stage's own command line under torchrun; only rank 0 writes and opens an MLflow run."""
    root = project.root
    params = _params(project, tmp_path / "params.yaml", **{"train_tokenizer.micro_batch_size": 2})
    assert _two_processes(_argv(project, params, "uninterrupted", "ck_uninterrupted", "uninterrupted.json")) == [0, 0]
    argv = _argv(project, params, "resumed", "ck_resumed", "resumed.json")
    assert _two_processes(argv, kill_step=4) == [1, 1]
    assert sorted(p.name for p in (root / "ck_resumed").glob("step_*.pt")) == ["step_00000003.pt"]
    assert not (root / "resumed").exists()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SPECTRALAR_NPROC_PER_NODE="2",
               SPECTRALAR_TRACKING="1", MLFLOW_TRACKING_URI=store)
    result = subprocess.run([sys.executable, "-m", "spectralar", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((root / "resumed.timing.json").read_text())["resumed_from_step"] == 3
    expected, actual = _weights(root / "uninterrupted" / "tokenizer.pt"), _weights(root / "resumed" / "tokenizer.pt")
    for part in ("tokenizer", "proxy"):
        for key, value in expected[part].items():
            assert torch.equal(value, actual[part][key]), (part, key)
    assert (root / "resumed" / "history.csv").read_bytes() == (root / "uninterrupted" / "history.csv").read_bytes()
    resumed, uninterrupted = (json.loads((root / f"{name}.json").read_text()) for name in ("resumed", "uninterrupted"))
    assert resumed == uninterrupted and resumed["world_size"] == 2 and resumed["restarted_codes"] > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("spectralar").experiment_id],
                              filter_string="tags.`spectralar.stage` = 'train_tokenizer'")
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"


# ------------------------------------------------------------------------------------------ batch split

def _trainer(project: Project, rank: int, world_size: int, **overrides):
    """A Trainer as process ``rank`` of ``world_size`` sees it (no process group: nothing is trained);
    the pixel head, which reads no proxy codes, so that flips are allowed."""
    from spectralar.stages.train_tokenizer import Trainer
    from spectralar.training import DistributedContext

    params = load_params(project.params)
    train = ImageShards(project.root / "prepared", "train")
    proxy = load_proxy(project.root / "proxy" / "proxy.pt", torch.device("cpu"))
    tokenizer = dataclasses.replace(params.tokenizer, decoder_head="pixels")
    tok_cfg = tokenizer_config_for(tokenizer, train.image_shape, proxy.config.codebook_size)
    cfg = dataclasses.replace(params.train_tokenizer, **overrides)
    dist = DistributedContext(rank, rank, world_size, torch.device("cpu"), rank == 0)
    return Trainer(tok_cfg, cfg, train, proxy, project.root / "codes", torch.device("cpu"), seed=0, dist=dist)


def test_each_process_draws_its_slice_of_the_global_flips_and_levels(project):
    """Rank r's flipped images and prefix levels are rows r·b..(r+1)·b of the single-process step's."""
    train = ImageShards(project.root / "prepared", "train")
    x = to_float(torch.from_numpy(train.images(list(range(8)))).permute(0, 3, 1, 2))  # (8, C, H, W)
    flips = {"augment_hflip": True}
    full_x, full_levels = _trainer(project, 0, 1, **flips).step_inputs(5, x)
    assert not torch.equal(full_x, x) and len(set(full_levels.tolist())) > 1  # some flipped, levels vary
    for rank in (0, 1):
        trainer = _trainer(project, rank, 2, **flips)
        mine = slice(4 * rank, 4 * rank + 4)
        share_x, share_levels = trainer.step_inputs(5, x[mine])
        assert torch.equal(share_x, full_x[mine]) and torch.equal(share_levels, full_levels[mine])


def test_micro_batches_split_each_process_share(project):
    trainer = _trainer(project, 1, 2, micro_batch_size=2)  # batch 8 over 2 processes: 4 each, 2 passes
    assert (trainer.local_batch, trainer.micro_batches()) == (4, [slice(0, 2), slice(2, 4)])
    assert _trainer(project, 0, 2, micro_batch_size=64).micro_batches() == [slice(0, 4)]  # at most the share
    assert _trainer(project, 0, 1).micro_batches() == [slice(0, 8)]  # 0: the whole share in one pass
    with pytest.raises(ConfigError, match="batch_size: 8 is not divisible by the 3 processes"):
        _trainer(project, 0, 3)
    with pytest.raises(ConfigError, match="micro_batch_size: 3 does not divide the 4 images of each process"):
        _trainer(project, 0, 2, micro_batch_size=3)
