from __future__ import annotations

import pytest

from spectralar.io import atomic_path, read_json, write_json


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
