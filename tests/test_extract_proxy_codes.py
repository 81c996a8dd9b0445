"""extract_proxy_codes at scale: resident memory independent of the image count, sharding over ranks.

(Resume after a kill and agreement with a direct computation are in tests/test_tokenizer_stages.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from spectralar.cli import build_parser, run_stage
from tests.conftest import REPO, TINY, make_fashion_dir, write_params

# A proxy without downsampling keeps a 32x32 code grid: a table row is 8 levels x 1024 positions x 2 B
# = 16 KB, so 6,800 images make a 106 MB table, far above the tolerance below: a stage that kept the
# table (or its memory-mapped pages, or the images, or their codes) resident would fail.
# The proxy is narrower than TINY's (4 channels, 8 codes): what is measured is memory against the image
# count, and a cheaper proxy per image halves the test's time (its two 6,800-image runs dominate).
WIDE_ROWS = {"proxy.channel_multipliers": [1], "proxy.base_channels": 4, "proxy.codebook_size": 8,
             "extract_proxy_codes.batch_size": 85}  # 80 batches at 6,800
IMAGE_COUNTS = (400, 6800)
# What is compared is the peak of the stage's anonymous memory (heap and arrays: RssAnon, sampled from
# /proc/<pid>/status), the lower of two runs per count. The kernel's peak of all resident memory
# (VmHWM, ru_maxrss) moved by 70 MB between runs of one command (681-750 MB at 9,000 images) and failed
# this test at +65 MB with no growth behind it: it includes the libraries' file-backed pages, whose
# count depends on what the page cache holds. The anonymous peak moved by up to 32 MB in single runs.
# File-backed pages are not measured, so a writer that kept the table memory-mapped would pass: the
# stage writes rows with pwrite (extract_proxy_codes._table_writer says why), which this does not test.
TOLERANCE_BYTES = 48 << 20
RUNS_PER_COUNT = 2


def _argv(stage: str, params: Path, root: Path, data: Path, out: Path, metrics: Path) -> list[str]:
    paths = {"prepare": ["--out", data],
             "train_proxy": ["--data", data, "--out", root / "proxy", "--checkpoints", root / "ck_proxy"],
             "extract_proxy_codes": ["--data", data, "--proxy", root / "proxy/proxy.pt", "--out", out]}[stage]
    return [stage, "--params", str(params), "--metrics", str(metrics), *map(str, paths)]


# Runs a command and prints its peak resident set last. Linux starts a child's peak at the resident
# size of the process that launched it (exec keeps the old address space's high-water mark), so the
# stage is launched from this small process, never from pytest (gigabytes after other tests).
_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(process.pid, 0)
print(f"peak_resident_bytes={usage.ru_maxrss * 1024}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], cwd: Path, env: dict) -> tuple[int, str, int]:
    """(exit code, output, peak resident bytes) of ``command`` (ru_maxrss of it and its own children)."""
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], cwd=cwd, env=env, capture_output=True,
                            text=True)
    *lines, last = result.stdout.rstrip("\n").split("\n")
    assert last.startswith("peak_resident_bytes="), result.stdout[-2000:] + result.stderr[-3000:]
    return result.returncode, "\n".join(lines) + result.stderr, int(last.split("=")[1])


def run_sampled(command: list[str], cwd: Path, env: dict, interval: float = 0.01) -> tuple[int, str, int]:
    """(exit code, output, peak anonymous resident bytes) of ``command``: its RssAnon (heap, arrays),
    sampled every ``interval`` seconds from /proc/<pid>/status. Memory a stage keeps stays resident
    until it exits, so the sampling cannot miss it."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:  # exited between the poll and the read
                break
            for line in status.splitlines():  # no RssAnon line once the process is a zombie
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) << 10)
            time.sleep(interval)
        process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    return process.returncode, output, peak


def _run_stage(argv: list[str]) -> int:
    """Run a stage's command line; its peak anonymous resident bytes (``run_sampled``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SPECTRALAR_TRACKING="0")
    code, output, peak = run_sampled([sys.executable, "-m", "spectralar", *argv], REPO, env)
    assert code == 0, output[-3000:]
    return peak


@pytest.fixture
def datasets(tmp_path) -> tuple[Path, dict[int, Path]]:
    """A params file, one trained wide-grid proxy and a prepared dataset per image count."""
    prepared = {}
    for count in IMAGE_COUNTS:
        fashion = make_fashion_dir(tmp_path / f"fashion{count}", n_train=count, n_val=20)
        params = write_params(tmp_path / f"params{count}.yaml",
                              {"data.fashion_mnist_dir": str(fashion), **TINY, **WIDE_ROWS})
        prepared[count] = tmp_path / f"prepared{count}"
        run_stage("prepare", build_parser().parse_args(_argv("prepare", params, tmp_path, prepared[count], tmp_path,
                                                             tmp_path / "prepare.json")))
    run_stage("train_proxy", build_parser().parse_args(_argv("train_proxy", params, tmp_path, prepared[IMAGE_COUNTS[0]],
                                                             tmp_path, tmp_path / "train_proxy.json")))
    return params, prepared


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, datasets):
    params, prepared = datasets
    peaks = {}
    for count in IMAGE_COUNTS:
        out = tmp_path / f"codes{count}"
        runs = []
        for _ in range(RUNS_PER_COUNT):
            shutil.rmtree(out, ignore_errors=True)  # a finished table would be kept, not recomputed
            runs.append(_run_stage(_argv("extract_proxy_codes", params, tmp_path, prepared[count], out,
                                         tmp_path / f"extract{count}.json")))
        peaks[count] = min(runs)
        table = np.load(out / "train.npy", mmap_mode="r")
        assert table.shape == (count, 8, 32 * 32) and table.nbytes == count * 16384
        timing = json.loads((tmp_path / f"extract{count}.timing.json").read_text())
        assert timing["images_per_second"] > 0  # telemetry, not a result
        assert "images_per_second" not in json.loads((tmp_path / f"extract{count}.json").read_text())
    small, large = (peaks[count] for count in IMAGE_COUNTS)
    grown_table = (IMAGE_COUNTS[1] - IMAGE_COUNTS[0]) * 16384
    assert grown_table > 2 * TOLERANCE_BYTES  # the test can see a stage that keeps its table resident
    assert small > 100 << 20  # the sampling saw the running stage (torch alone is more)
    assert large - small < TOLERANCE_BYTES, (small, large)


def test_ranks_write_disjoint_rows_of_one_table(tmp_path, fashion_dir):
    """Two shard processes (started rank 1 first) give the single-process table, byte for byte."""
    params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(fashion_dir), **TINY})
    data = tmp_path / "prepared"
    for stage in ("prepare", "train_proxy"):
        run_stage(stage, build_parser().parse_args(_argv(stage, params, tmp_path, data, tmp_path,
                                                         tmp_path / f"{stage}.json")))
    single = run_stage("extract_proxy_codes", build_parser().parse_args(
        _argv("extract_proxy_codes", params, tmp_path, data, tmp_path / "codes", tmp_path / "single.json")))
    assert single["resumed_from_row"] == 0 and "rank" not in single
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SPECTRALAR_TRACKING="0")
    processes = [subprocess.Popen([sys.executable, "-m", "spectralar",
                                   *_argv("extract_proxy_codes", params, tmp_path, data, tmp_path / "sharded",
                                          tmp_path / f"rank{rank}.json"), "--rank", str(rank), "--world-size", "2"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in (1, 0)]  # rank 1 first: rank 0 must wait for its rows
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert (rank0["rows"], rank1["rows"]) == ([0, 30], [30, 60])  # disjoint, together every row
    assert "table_bytes" in rank0 and "table_bytes" not in rank1  # rank 0 assembles the table
    assert np.array_equal(np.load(tmp_path / "sharded" / "train.npy"), np.load(tmp_path / "codes" / "train.npy"))
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert sorted(path.name for path in (tmp_path / "sharded").iterdir()) == ["config.json", "manifest.json",
                                                                              "train.npy"]
    assert not (tmp_path / "sharded.partial").exists()


def test_a_rank_outside_the_world_is_refused():
    from spectralar.stages.extract_proxy_codes import shard_rows

    assert [list(shard_rows(10, rank, 3)) for rank in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="--rank must lie in"):
        shard_rows(10, 3, 3)
