from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pytest

from spectralar.config import ConfigError, build, check_sections_together, load_params, read_yaml, section_class, \
    to_dict
from spectralar.spectral import frequency_schedule
from tests.conftest import REPO, default_params, write_params


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
    with pytest.raises(ConfigError, match=r"^data\.jpeg_quality: must be in \[1, 100\], got 0$"):
        load_params(write_params(tmp_path / "p.yaml", {"data.jpeg_quality": 0}))
    with pytest.raises(ConfigError, match=r"train_tokenizer\.cpu_bf16: expected .*got 'sometimes'"):
        load_params(write_params(tmp_path / "p.yaml", {"train_tokenizer.cpu_bf16": "sometimes"}))
    for value in (True, False, "auto"):  # bool or auto (native bf16 CPUs only)
        params = load_params(write_params(tmp_path / "p.yaml", {"train_generator.cpu_bf16": value}))
        assert params.train_generator.cpu_bf16 == value
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


# --------------------------------------------------------------------------------------------
# Every numeric params value is range-checked where it is read
# --------------------------------------------------------------------------------------------

# Keys whose 0 means something (what it means), and the other keys that 0 needs to stay consistent.
# Any other numeric key must refuse 0; every numeric key must refuse a negative value.
ZERO_ALLOWED: dict[str, tuple[str, dict]] = {
    "run.seed": ("seed 0", {}),
    "proxy.commitment_weight": ("no commitment loss", {}),
    "tokenizer.commitment_weight": ("no commitment loss", {}),
    "train_proxy.weight_decay": ("no weight decay", {}),
    "train_proxy.warmup_steps": ("no warm-up", {}),
    "train_proxy.ema_decay": ("EMA = the live weights", {}),
    "train_proxy.dead_code_restart_every": ("off", {}),
    "train_tokenizer.stage1_steps": ("stage 2 only", {"train_tokenizer.warmup_steps": 0, "train_tokenizer.stage2_steps": 10}),
    "train_tokenizer.stage2_steps": ("stage 1 only", {"train_tokenizer.stage2_warmup_steps": 0}),
    "train_tokenizer.final_lr": ("decay to 0", {}),
    "train_tokenizer.betas[0]": ("no momentum", {}),
    "train_tokenizer.betas[1]": ("Adam's beta2 = 0", {}),
    "train_tokenizer.stage2_betas[0]": ("no momentum", {}),
    "train_tokenizer.stage2_betas[1]": ("Adam's beta2 = 0", {}),
    "train_tokenizer.weight_decay": ("no weight decay", {}),
    "train_tokenizer.warmup_steps": ("no warm-up", {}),
    "train_tokenizer.stage2_warmup_steps": ("no warm-up", {}),
    "train_tokenizer.ema_decay": ("EMA = the live weights", {}),
    "train_tokenizer.dead_code_restart_every": ("off", {}),
    "train_tokenizer.dead_code_restart_until": ("restarts through all of stage 1", {}),
    "train_tokenizer.l2_weight": ("no L2 term", {}),
    "train_tokenizer.perceptual_weight": ("off", {}),
    "train_tokenizer.adversarial_weight": ("off", {}),
    "train_tokenizer.adversarial_start_step": ("from the start of stage 2", {}),
    "train_tokenizer.lecam_weight": ("off", {}),
    "train_tokenizer.micro_batch_size": ("each process's whole share in one pass", {}),
    "train_tokenizer.loader_workers": ("batches read in the training process", {}),
    "evaluate.baseline_images": ("no PCA/DCT baseline columns", {}),
    "generator.drop_path_rate": ("off", {}),
    "generator.dropout": ("off", {}),
    "generator.class_dropout": ("no unconditional training", {}),
    "train_generator.betas[0]": ("no momentum", {}),
    "train_generator.betas[1]": ("Adam's beta2 = 0", {}),
    "train_generator.weight_decay": ("no weight decay", {}),
    "train_generator.warmup_steps": ("no warm-up", {}),
    "train_generator.final_lr": ("decay to 0", {}),
    "train_generator.ema_decay": ("EMA = the live weights", {}),
    "train_generator.val_images": ("skip the held-out evaluation", {}),
    "sample.cfg_scale": ("no guidance", {}),
    "sample.top_k": ("off", {}),
    "sample.top_p": ("off", {}),
    "sample.truncate[0]": ("the full sequence", {}),
    "sample.truncate[1]": ("the full sequence", {}),
    "sample.truncate[2]": ("the full sequence", {}),
    "sample.progression_samples": ("no figure", {}),
    "sample.superres_samples": ("no figure", {}),
}


def _is_numeric(annotation) -> bool:
    return annotation in (int, float) or any(_is_numeric(arg) for arg in typing.get_args(annotation))


def numeric_params_keys() -> dict[str, type]:
    """Every numeric value of params.yaml (list items as ``key[i]``, null keys whose annotation is a
    number), with its type: taken from the file, so a new key is covered without editing this test."""
    keys = {}
    for section, values in default_params().items():
        if section == "sweeps":  # rows of overrides, checked when a row's params file is written
            continue
        hints = typing.get_type_hints(section_class(section))
        for name, value in values.items():
            kind = float if float in typing.get_args(hints[name]) + (hints[name],) else int
            if isinstance(value, list):
                keys.update({f"{section}.{name}[{i}]": type(item) for i, item in enumerate(value)
                             if isinstance(item, (int, float)) and not isinstance(item, bool)})
            elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                    value is None and _is_numeric(hints[name])):
                keys[f"{section}.{name}"] = kind
    return keys


def _with_value(key: str, value) -> dict:
    """``{"section.key": value}`` overrides for write_params; ``key[i]`` replaces one list item."""
    match = re.fullmatch(r"(.+)\[(\d+)\]", key)
    if not match:
        return {key: value}
    section, name = match.group(1).split(".")
    items = list(default_params()[section][name])
    items[int(match.group(2))] = value
    return {match.group(1): items}


def test_the_numeric_key_list_is_complete():
    keys = numeric_params_keys()
    assert len(keys) > 100 and "train_tokenizer.lr" in keys and "data.max_images_per_class" in keys
    assert "proxy.channel_multipliers[2]" in keys and "generator.width" in keys
    assert not set(ZERO_ALLOWED) - set(keys), "ZERO_ALLOWED names a key params.yaml no longer has"


def _refused(tmp_path, key: str, value, extra: dict = {}) -> str:
    with pytest.raises(ConfigError) as error:
        load_params(write_params(tmp_path / "p.yaml", {**extra, **_with_value(key, value)}))
    message = str(error.value)
    list_key = key.partition("[")[0]
    assert message.startswith(f"{key}: ") or (key != list_key and message.startswith(f"{list_key}: ")), message
    assert "\n" not in message and f"{value}" in message, message
    return message


@pytest.mark.parametrize("key", sorted(numeric_params_keys()))
def test_every_numeric_key_refuses_a_negative_value_and_a_meaningless_zero(tmp_path, key):
    negative = -1.0 if numeric_params_keys()[key] is float else -1
    message = _refused(tmp_path, key, negative)
    assert "must be" in message  # what is allowed
    if key in ZERO_ALLOWED:
        _, extra = ZERO_ALLOWED[key]
        params = load_params(write_params(tmp_path / "zero.yaml", {**extra, **_with_value(key, 0)}))
        assert params.path.endswith("zero.yaml")
    else:
        _refused(tmp_path, key, 0)


@pytest.mark.parametrize("key, value, allowed", [
    ("train_tokenizer.lr", -1e-3, "> 0"),
    ("train_tokenizer.ema_decay", 1.0, "in [0, 1)"),
    ("train_tokenizer.betas[1]", 1.5, "in [0, 1)"),
    ("train_tokenizer.warmup_steps", 10**6, "at most stage1_steps"),
    ("data.max_images_per_class", 0, "or null for all images"),
    ("data.jpeg_quality", 101, "in [1, 100]"),
    ("run.seed", 2**40, "a 32-bit seed"),
    ("extract_proxy_codes.batch_size", -1, ">= 1"),
    ("sample.top_p", 1.5, "in [0, 1]"),
])
def test_the_message_names_the_key_the_value_and_what_is_allowed(tmp_path, key, value, allowed):
    message = _refused(tmp_path, key, value)
    assert message == f"{key}: must be {message.split('must be ', 1)[1]}" and allowed in message


def test_a_duplicate_key_is_refused_with_file_and_line(tmp_path):
    text = (REPO / "params.yaml").read_text()
    assert "\n  lr: " in text
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("\n  lr: ", "\n  lr: 5.0\n  lr: ", 1))  # the first section with an lr
    line = path.read_text().splitlines().index("  lr: 5.0") + 1
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value) == f"{path}:{line + 1}: duplicate key 'lr' (first on line {line}); keep one"
    path.write_text("run: {seed: 0, seed: 1, device: auto}\n")  # flow mappings too
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: duplicate key 'seed'"):
        read_yaml(path)
    path.write_text("base: &base {a: 1}\nrow: {<<: *base, a: 2}\n")  # a merge key still overrides
    assert read_yaml(path) == {"base": {"a": 1}, "row": {"a": 2}}


def test_a_yaml_syntax_error_is_one_line_with_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seed: [0\n")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}:") and "not valid YAML" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("resolution, nonuniform", [(32, True), (32, False), (64, True), (256, True), (17, False)])
def test_the_largest_allowed_n_is_the_largest_with_an_omega_schedule(tmp_path, resolution, nonuniform):
    """The load-time bound on N agrees with the schedule itself (frequency_schedule, eq. 9 generalised)."""
    kind = "nonuniform" if nonuniform else "uniform"
    feasible = []
    for n in range(1, resolution + 2):
        try:
            frequency_schedule(n, resolution, kind)
            feasible.append(n)
        except ValueError:
            pass
    most = max(feasible)
    patch = 1 if resolution % 2 else 4
    base = {"data.resolution": resolution, "tokenizer.patch_size": patch, "tokenizer.nonuniform_mapping": nonuniform}
    check_sections_together(load_params(write_params(tmp_path / "ok.yaml", {**base, "tokenizer.num_tokens": most})),
                            ("tokenizer",))
    bad = load_params(write_params(tmp_path / "bad.yaml", {**base, "tokenizer.num_tokens": most + 1}))
    check_sections_together(bad, ("run", "data"))  # prepare does not read the tokenizer: not stopped by it
    with pytest.raises(ConfigError, match=rf"^tokenizer\.num_tokens: must be <= {most} for data\.resolution "
                                          rf"{resolution} with the {kind} .*, got {most + 1}$"):
        check_sections_together(bad, ("run", "tokenizer", "train_tokenizer"))


def test_a_patch_size_or_encoder_patch_size_that_does_not_divide_the_resolution_is_refused(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", {"tokenizer.patch_size": 8, "data.resolution": 36}))
    with pytest.raises(ConfigError, match=r"^tokenizer\.patch_size: must divide data\.resolution \(36\), got 8$"):
        check_sections_together(params, ("tokenizer",))
    params = load_params(write_params(tmp_path / "e.yaml", {"tokenizer.encoder_patch_size": 8, "data.resolution": 36}))
    with pytest.raises(ConfigError, match=r"^tokenizer\.encoder_patch_size: must divide data\.resolution \(36\), got 8$"):
        check_sections_together(params, ("tokenizer",))


def test_an_n_without_an_omega_schedule_stops_the_stage_at_exit_2(tmp_path, monkeypatch, capsys):
    """The issue's case: an N too large for the image size was a traceback from the ω schedule."""
    from spectralar.cli import main

    params = write_params(tmp_path / "p.yaml", {"tokenizer.num_tokens": 40})
    monkeypatch.chdir(tmp_path)
    code = main(["extract_proxy_codes", "--params", str(params), "--metrics", "m.json", "--out", "codes"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "bad params: tokenizer.num_tokens: must be <= 26 for data.resolution 32" in err


def test_a_bad_value_through_the_cli_is_exit_2_and_one_line(tmp_path, monkeypatch, capsys):
    """The issue's case: extract_proxy_codes.batch_size -1 exited 0 with a table of zeros."""
    from spectralar.cli import main

    params = write_params(tmp_path / "p.yaml", {"extract_proxy_codes.batch_size": -1})
    monkeypatch.chdir(tmp_path)
    code = main(["extract_proxy_codes", "--params", str(params), "--metrics", "m.json", "--out", "codes"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "codes").exists()
    assert "bad params: extract_proxy_codes.batch_size: must be >= 1, got -1" in err


def test_a_bad_verify_mode_is_a_config_error(monkeypatch):
    from spectralar.io import hash_on_open

    monkeypatch.setenv("SPECTRALAR_VERIFY", "sometimes")
    with pytest.raises(ConfigError, match="SPECTRALAR_VERIFY must be auto, full or fast, got 'sometimes'"):
        hash_on_open(10)
    for mode, small, large in (("full", True, True), ("fast", False, False), ("auto", True, False)):
        monkeypatch.setenv("SPECTRALAR_VERIFY", mode)
        assert (hash_on_open(10), hash_on_open(1 << 40)) == (small, large)


def test_a_negative_number_is_refused_even_where_the_dataclass_checks_nothing():
    """The floor under every numeric key: a new key whose dataclass has no check yet still refuses -1."""
    with pytest.raises(ConfigError, match=r"^train\.lr: must be >= 0 \(no params value is negative\), got -1\.0$"):
        build(Inner, {"lr": -1, "steps": 1, "kind": "a", "sizes": [1], "note": None}, "train")
    with pytest.raises(ConfigError, match=r"^train\.sizes\[1\]: must be >= 0 .*, got -4$"):
        build(Inner, {"lr": 1.0, "steps": 1, "kind": "a", "sizes": [1, -4], "note": None}, "train")
