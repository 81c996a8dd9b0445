from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import pytest

from spectralar.config import ConfigError, build, load_params, to_dict
from tests.conftest import REPO, write_params


@dataclass(frozen=True)
class Inner:
    lr: float
    steps: int
    kind: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    note: Optional[str] = None


def test_default_params_file_loads():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "fashion_mnist"
    assert params.data.resolution == 32
    assert params.run.seed == 0


def test_build_converts_and_freezes():
    obj = build(Inner, {"lr": "1e-4", "steps": 3, "kind": "b", "sizes": [4, 5], "note": None}, "train")
    assert obj.lr == pytest.approx(1e-4) and obj.sizes == (4, 5)
    with pytest.raises(Exception):
        obj.lr = 2.0  # frozen
    assert to_dict(obj)["sizes"] == [4, 5]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lr": "fast", "steps": 1, "kind": "a", "sizes": [1], "note": None}, "train.lr: expected float, got 'fast'"),
        ({"lr": 1.0, "steps": 1.5, "kind": "a", "sizes": [1], "note": None}, "train.steps: expected int"),
        ({"lr": 1.0, "steps": True, "kind": "a", "sizes": [1], "note": None}, "train.steps: expected int"),
        ({"lr": 1.0, "steps": 1, "kind": "c", "sizes": [1], "note": None}, "train.kind: expected one of"),
        ({"lr": 1.0, "steps": 1, "kind": "a", "sizes": [1, "x"], "note": None}, "train.sizes[1]: expected int"),
        ({"lr": 1.0, "steps": 1, "kind": "a", "sizes": [1], "note": 3}, "train.note: expected"),
        ({"lr": 1.0, "steps": 1, "kind": "a", "sizes": [1]}, "train.note: missing key"),
        ({"lr": 1.0, "steps": 1, "kind": "a", "sizes": [1], "note": None, "extra": 1}, "train.extra: unknown key"),
    ],
)
def test_build_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        build(Inner, data, "train")
    assert message in str(err.value)


def test_params_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.resolution: expected int, got 'big'"):
        load_params(write_params(tmp_path / "p.yaml", {"data.resolution": "big"}))
    with pytest.raises(ConfigError, match=r"data\.colour: unknown key"):
        load_params(write_params(tmp_path / "p.yaml", {"data.colour": 3}))
    with pytest.raises(ConfigError, match=r"data: jpeg_quality must be in 1\.\.100"):
        load_params(write_params(tmp_path / "p.yaml", {"data.jpeg_quality": 0}))
    path = tmp_path / "bad.yaml"
    path.write_text("run: {seed: 0, device: auto}\nbogus: {}\n")
    with pytest.raises(ConfigError, match="bogus: unknown section"):
        load_params(path)
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")


def test_digest_depends_only_on_named_sections(tmp_path):
    a = load_params(write_params(tmp_path / "a.yaml"))
    b = load_params(write_params(tmp_path / "b.yaml", {"tracking.experiment": "other"}))
    assert a.digest(("data",)) == b.digest(("data",))
    assert a.digest(("tracking",)) != b.digest(("tracking",))


@dataclass(frozen=True)
class WithMapping:
    rows: dict[str, dict[str, Any]]
    sizes: dict[str, int]


def test_mappings_are_checked_key_by_key():
    obj = build(WithMapping, {"rows": {"a": {"x.y": False}}, "sizes": {"small": 2}}, "sweeps")
    assert obj.rows == {"a": {"x.y": False}} and to_dict(obj) == {"rows": {"a": {"x.y": False}}, "sizes": {"small": 2}}
    with pytest.raises(ConfigError, match=r"sweeps.sizes.small: expected int, got 'two'"):
        build(WithMapping, {"rows": {}, "sizes": {"small": "two"}}, "sweeps")
    with pytest.raises(ConfigError, match=r"sweeps.rows: expected a mapping, got \[1\]"):
        build(WithMapping, {"rows": [1], "sizes": {}}, "sweeps")


@pytest.mark.parametrize("key, source", [
    ("proxy.image_size", "the prepared dataset's manifest"),
    ("proxy.in_channels", "the prepared dataset's manifest"),
    ("tokenizer.image_size", "the prepared dataset's manifest"),
    ("tokenizer.in_channels", "the prepared dataset's manifest"),
    ("tokenizer.proxy_codebook_size", "the proxy model file"),
    ("generator.vocab_size", "the token dump's manifest"),
    ("generator.num_tokens", "the token dump's manifest"),
    ("generator.num_classes", "the token dump's manifest"),
])
def test_values_declared_upstream_are_refused_in_params(tmp_path, key, source):
    """Values flow downstream: an old params file that restates one is told where it now comes from."""
    with pytest.raises(ConfigError, match=rf"^{key}: no longer a params key: its value comes from {source}"):
        load_params(write_params(tmp_path / "old.yaml", {key: 32}))


def test_derived_fields_stay_out_of_the_recorded_params(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml"))
    recorded = params.subset(("proxy", "tokenizer", "generator"))
    assert "image_size" not in recorded["tokenizer"] and "proxy_codebook_size" not in recorded["tokenizer"]
    assert "in_channels" not in recorded["proxy"] and "num_tokens" not in recorded["generator"]
    assert recorded["tokenizer"]["num_tokens"] == params.tokenizer.num_tokens  # N is declared here, once
