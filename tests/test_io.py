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
