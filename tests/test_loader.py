"""The training loader: its batches do not depend on the number of worker processes, and the read
benchmark reports what it can feed beside the model's images/s."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from spectralar.cli import run_stage
from spectralar.data.loader import step_loader
from spectralar.data.shards import ImageShards
from tests.conftest import make_fashion_dir, write_params


def _prepared(tmp_path):
    fashion = make_fashion_dir(tmp_path / "fashion", n_train=40, n_val=10)
    params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(fashion), "data.shard_size": 16})
    out = tmp_path / "prepared"
    run_stage("prepare", argparse.Namespace(params=str(params), metrics=str(tmp_path / "prepare.json"), out=str(out)))
    return out


def test_worker_processes_give_the_same_batches_in_the_same_order(tmp_path):
    shards = ImageShards(_prepared(tmp_path), "train")

    def batches(workers: int, start: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        loader = step_loader(shards, batch_size=8, seed=3, start_step=start, total_steps=12, workers=workers,
                             rank=1, world_size=2)
        return [(images.numpy(), labels.numpy(), index.numpy()) for images, labels, index in loader]

    serial = batches(0, 0)
    assert len(serial) == 12 and serial[0][0].shape == (4, 1, 32, 32)  # rank 1's half of the global batch
    for got in (batches(2, 0), batches(2, 5)[-7:]):  # from the start, and resumed at step 5
        expected = serial[-len(got):]
        assert all(np.array_equal(a, b) for x, y in zip(got, expected) for a, b in zip(x, y))


def test_the_read_benchmark_reports_the_loader_beside_the_reads(tmp_path):
    from spectralar.bench import bench_read

    torch.set_num_threads(1)
    result = bench_read(argparse.Namespace(data=str(_prepared(tmp_path)), split="train", num=32, resolution=32,
                                           workers=2, loader_batch=8))
    assert result["images_read"] == 32 and result["read_images_per_second_one_core"] > 0
    assert result["loader_images_per_second_workers0"] > 0 and result["loader_images_per_second_workers2"] > 0
