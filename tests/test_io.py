from __future__ import annotations

import pytest

import errno
import os
from pathlib import Path

from spectralar.io import atomic_path, atomic_paths, read_json, temporary_siblings, write_json


def test_atomic_file_never_half_written(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "trunc')
            raise RuntimeError("killed midway")
    assert read_json(target) == {"a": 1}  # the old complete output survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_atomic_directory(tmp_path):
    target = tmp_path / "dir"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "x").write_text("1")
        assert not target.exists()  # invisible until complete
    assert (target / "x").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "y").write_text("2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_json_is_deterministic(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    write_json(tmp_path / "b.json", {"a": [1.5, None], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_metrics_hold_results_and_telemetry_goes_beside_them():
    from spectralar.io import split_telemetry, timing_file

    metrics = {"fid": 12.5, "psnr_prefix": [30.0], "steps": 600, "stage_seconds": 3.2, "train_seconds": 2.0,
               "images_per_second": 90.0, "decode_images_per_second": 80.0, "tokens_per_second": 1e4, "mfu": None,
               "resumed_from_step": 3, "images_per_second_kv_cache": 5.0, "kv_cache_speedup": 4.0,
               "num_samples": 1000, "eval_images": 500}
    results, telemetry = split_telemetry(metrics)
    assert results == {"fid": 12.5, "psnr_prefix": [30.0], "steps": 600, "num_samples": 1000, "eval_images": 500}
    assert set(telemetry) == set(metrics) - set(results)
    assert timing_file("metrics/evaluate.json").as_posix() == "metrics/evaluate.timing.json"
    assert timing_file("runs/ablation/baseline/metrics/sample.json").name == "sample.timing.json"


def _state(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", ["raise in the block", "full disk at the flush of the last output"])
def test_outputs_that_belong_together_are_all_new_or_all_old(tmp_path, monkeypatch, fault):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"old figure")
    (tmp_path / "page.md").write_text("old page")
    paths = [tmp_path / "figures", tmp_path / "table.csv", tmp_path / "page.md"]
    before = _state(tmp_path)
    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / ".page.md.")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    if fault.startswith("full disk"):
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises((RuntimeError, OSError)):
        with atomic_paths(paths, directories=(tmp_path / "figures",)) as (figures, table, page):
            (figures / "a.png").write_bytes(b"new figure")
            table.write_text("new table")
            if fault == "raise in the block":
                raise RuntimeError("boom")
            page.write_text("new page")
    assert _state(tmp_path) == before  # the figures, the page and the (absent) table as they were
    assert not [t for p in paths for t in temporary_siblings(p)]
    monkeypatch.undo()
    with atomic_paths(paths, directories=(tmp_path / "figures",)) as (figures, table, page):
        (figures / "b.png").write_bytes(b"new figure")
        table.write_text("new table")
        page.write_text("new page")
    assert _state(tmp_path) == {"figures/b.png": b"new figure", "page.md": b"new page", "table.csv": b"new table"}
