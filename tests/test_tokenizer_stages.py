"""train_proxy -> extract_proxy_codes -> train_tokenizer on a tiny config: outputs, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spectralar.cli import build_parser, run_stage
from spectralar.models.proxy_vq import ProxyVQModel
from spectralar.artifacts import config_from_dict, load_model_file, load_proxy, proxy_config_for, tokenizer_config_for
from spectralar.config import load_params
from spectralar.data.shards import ImageShards
from spectralar.training import NonFiniteLossError, seed_everything
from tests.conftest import TINY, write_params


class Project:
    """Runs stages in-process with the CLI's own argument parsing, in a temporary directory."""

    def __init__(self, root: Path, fashion_dir: Path, overrides: dict | None = None) -> None:
        self.root = root
        self.params = write_params(root / "params.yaml", {
            "data.fashion_mnist_dir": str(fashion_dir), **TINY, **(overrides or {})})

    def argv(self, stage: str) -> list[str]:
        r = self.root
        paths = {
            "prepare": ["--out", r / "prepared"],
            "train_proxy": ["--data", r / "prepared", "--out", r / "proxy", "--checkpoints", r / "ck_proxy"],
            "extract_proxy_codes": ["--data", r / "prepared", "--proxy", r / "proxy/proxy.pt", "--out", r / "codes"],
            "train_tokenizer": ["--data", r / "prepared", "--proxy", r / "proxy/proxy.pt", "--codes", r / "codes",
                                "--out", r / "tokenizer", "--checkpoints", r / "ck_tok"],
        }[stage]
        return [stage, "--params", str(self.params), "--metrics", str(r / f"{stage}.json"), *map(str, paths)]

    def run(self, stage: str) -> dict:
        return run_stage(stage, build_parser().parse_args(self.argv(stage)))

    def run_all(self, until: str = "train_tokenizer") -> dict:
        for stage in ("prepare", "train_proxy", "extract_proxy_codes", "train_tokenizer"):
            metrics = self.run(stage)
            if stage == until:
                return metrics
        raise AssertionError(until)


@pytest.fixture
def project(tmp_path, fashion_dir):
    torch.set_num_threads(1)
    return Project(tmp_path, fashion_dir)


def test_tiny_tokenizer_pipeline_end_to_end(project):
    metrics = project.run_all()
    root = project.root
    assert len(metrics["psnr_prefix"]) == 8 and metrics["omegas"] == [1, 2, 3, 4, 6, 8, 20, 32]
    assert metrics["steps"] == 10 and 0 < metrics["codebook_usage"] <= 1
    assert metrics["restarted_codes"] > 0  # TINY restarts dead codes every 2 steps of stage 1
    for name in ("tokenizer.pt", "prefixes.png", "history.csv", "config.json"):
        assert (root / "tokenizer" / name).is_file(), name
    state = load_model_file(root / "tokenizer" / "tokenizer.pt", "tokenizer")
    assert state["extra"]["omegas"] == metrics["omegas"] and state["configs"]["tokenizer"]["num_tokens"] == 8
    codes = json.loads((root / "codes" / "manifest.json").read_text())
    table = np.load(root / "codes" / "train.npy")
    assert table.shape == (60, 8, 8 * 8) and table.dtype == np.uint16 and codes["omegas"] == metrics["omegas"]
    assert not list((root / "ck_tok").glob("step_*.pt"))  # a finished run leaves nothing to resume


def test_proxy_codes_match_direct_computation(project):
    from spectralar.data.shards import ImageShards
    from spectralar.data.loader import to_float
    from spectralar.spectral import band_limit

    project.run_all(until="extract_proxy_codes")
    state = load_model_file(project.root / "proxy" / "proxy.pt", "proxy")
    from spectralar.models.proxy_vq import ProxyConfig

    proxy = ProxyVQModel(config_from_dict(ProxyConfig, state["configs"]["proxy"]))
    proxy.load_state_dict(state["weights"]["proxy"])
    proxy.eval()
    images = torch.from_numpy(ImageShards(project.root / "prepared", "train").images([5, 17])).permute(0, 3, 1, 2)
    table = np.load(project.root / "codes" / "train.npy")
    for level, omega in ((0, 1), (4, 6), (7, 32)):
        expected = proxy.encode_ids(band_limit(to_float(images), omega)).reshape(2, -1).numpy()
        assert np.array_equal(table[[5, 17], level], expected)


def test_extract_proxy_codes_resumes(project, monkeypatch):
    project.run_all(until="extract_proxy_codes")
    reference = np.load(project.root / "codes" / "train.npy")
    import spectralar.stages.extract_proxy_codes as stage

    calls = {"n": 0}
    original = stage.codes_for_levels

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    (project.root / "codes").rename(project.root / "codes_old")
    monkeypatch.setattr(stage, "codes_for_levels", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        project.run("extract_proxy_codes")
    assert not (project.root / "codes").exists()  # nothing that looks complete
    monkeypatch.setattr(stage, "codes_for_levels", original)
    metrics = project.run("extract_proxy_codes")
    assert metrics["resumed_from_row"] == 32
    assert np.array_equal(np.load(project.root / "codes" / "train.npy"), reference)


def _weights(path: Path) -> dict:
    return load_model_file(path, "tokenizer")["weights"]


@pytest.mark.parametrize("kill_step, checkpoints", [
    (4, ["step_00000003.pt"]),  # inside stage 1: the restart after step 4 needs step 3's usage counts
    (8, ["step_00000003.pt", "step_00000006.pt"]),  # inside stage 2 (stage 1 ends at step 6)
    (10, ["step_00000006.pt", "step_00000009.pt"]),  # from a stage-2 checkpoint: discriminator and LeCam state
])
def test_killed_tokenizer_run_resumes_bit_identically(project, monkeypatch, kill_step, checkpoints):
    reference = project.run_all()
    expected = _weights(project.root / "tokenizer" / "tokenizer.pt")
    expected_history = (project.root / "tokenizer" / "history.csv").read_bytes()
    import spectralar.stages.train_tokenizer as stage

    original = stage.Trainer._log

    def dies_after_kill_step(self, step, *args):
        original(self, step, *args)
        if step == kill_step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stage.Trainer, "_log", dies_after_kill_step)
    with pytest.raises(KeyboardInterrupt):
        project.run("train_tokenizer")
    assert sorted(p.name for p in (project.root / "ck_tok").glob("step_*.pt")) == checkpoints
    monkeypatch.setattr(stage.Trainer, "_log", original)
    resumed = project.run("train_tokenizer")
    actual = _weights(project.root / "tokenizer" / "tokenizer.pt")
    for part in ("tokenizer", "proxy"):
        for key, value in expected[part].items():
            assert torch.equal(value, actual[part][key]), (part, key)
    assert resumed["psnr_prefix"] == reference["psnr_prefix"]
    assert resumed["restarted_codes"] == reference["restarted_codes"]
    # the whole loss curve, rows logged before the kill included (it is checkpointed with the model)
    assert (project.root / "tokenizer" / "history.csv").read_bytes() == expected_history


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, fashion_dir, monkeypatch):
    project = Project(tmp_path, fashion_dir, {"tokenizer.decoder_head": "proxy_codes"})  # the cross-entropy path
    project.run_all(until="extract_proxy_codes")
    import spectralar.stages.train_tokenizer as stage

    original = stage.F.cross_entropy
    calls = {"n": 0}

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(stage.F, "cross_entropy", nan_at_step_5)
    with pytest.raises(NonFiniteLossError, match="step 4.*ce=nan"):
        project.run("train_tokenizer")
    assert [p.name for p in (project.root / "ck_tok").glob("step_*.pt")] == ["step_00000003.pt"]
    assert not (project.root / "tokenizer").exists()


def test_spectral_supervision_off_extracts_only_the_full_image_level(tmp_path, fashion_dir):
    project = Project(tmp_path, fashion_dir, {"tokenizer.spectral_supervision": False,
                                              "tokenizer.nonuniform_mapping": False,
                                              "tokenizer.causal_mask": False})
    metrics = project.run_all()
    assert np.load(tmp_path / "codes" / "train.npy").shape == (60, 1, 64)
    assert metrics["omegas"] == [4, 8, 12, 16, 20, 24, 28, 32]


def test_online_proxy_codes_mode(tmp_path, fashion_dir):
    project = Project(tmp_path, fashion_dir, {"extract_proxy_codes.mode": "online",
                                              "train_tokenizer.augment_hflip": True,
                                              "tokenizer.decoder_head": "proxy_codes"})
    metrics = project.run_all()
    assert metrics["decode"] == "soft"
    assert not (tmp_path / "codes" / "train.npy").exists()
    assert metrics["steps"] == 10


def test_hflip_needs_online_codes(tmp_path, fashion_dir):
    project = Project(tmp_path, fashion_dir, {"train_tokenizer.augment_hflip": True,
                                              "tokenizer.decoder_head": "proxy_codes"})
    with pytest.raises(ValueError, match="augment_hflip needs extract_proxy_codes.mode: online"):
        project.run_all()


def test_train_proxy_loads_a_named_checkpoint_instead_of_training(tmp_path, fashion_dir):
    project = Project(tmp_path, fashion_dir)
    project.run("prepare")
    from spectralar.config import load_params

    model = ProxyVQModel(load_params(project.params).proxy)
    torch.save(model.state_dict(), tmp_path / "official.bin")
    project.params = write_params(tmp_path / "params.yaml", {
        "data.fashion_mnist_dir": str(fashion_dir), **TINY, "train_proxy.checkpoint": str(tmp_path / "official.bin")})
    metrics = project.run("train_proxy")
    assert metrics["source"] == "checkpoint" and metrics["trained_steps"] == 0
    saved = load_model_file(tmp_path / "proxy" / "proxy.pt", "proxy")["weights"]["proxy"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    project.params = write_params(tmp_path / "params.yaml", {
        "data.fashion_mnist_dir": str(fashion_dir), **TINY, "train_proxy.checkpoint": str(tmp_path / "absent.bin")})
    with pytest.raises(FileNotFoundError, match="proxy.checkpoint"):
        project.run("train_proxy")


def test_perceptual_network_without_weights_is_a_clear_error(tmp_path, fashion_dir):
    project = Project(tmp_path, fashion_dir, {"train_tokenizer.perceptual_network": "vgg16",
                                              "train_tokenizer.perceptual_weight": 0.1})
    with pytest.raises(FileNotFoundError, match="train_tokenizer.perceptual_weights.*vgg16-397923af.pth"):
        project.run_all()


# ------------------------------------------------------------------------------------------ pure workers
# The training loops take explicit values (model config, optimiser settings, data, a logger) and need no
# params file or stage context; a stage's run(ctx) only wires params and paths to them.

def _same_weights(saved: dict, module: torch.nn.Module) -> bool:
    state = module.state_dict()
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_proxy_and_tokenizer_workers_reproduce_their_stages(project):
    from spectralar.stages.train_proxy import train as train_proxy
    from spectralar.stages.train_tokenizer import Trainer

    project.run("prepare")
    params = load_params(project.params)
    root, seed = project.root, params.run.seed
    train = ImageShards(root / "prepared", "train")

    seed_everything(seed)
    proxy = ProxyVQModel(proxy_config_for(params.proxy, train.image_shape))
    result = train_proxy(proxy, params.train_proxy, train, torch.device("cpu"), seed=seed)
    assert result["trained_steps"] == params.train_proxy.steps
    project.run("train_proxy")
    assert _same_weights(load_model_file(root / "proxy" / "proxy.pt", "proxy")["weights"]["proxy"], proxy)

    project.run("extract_proxy_codes")
    seed_everything(seed)
    proxy = load_proxy(root / "proxy" / "proxy.pt", torch.device("cpu"))
    config = tokenizer_config_for(params.tokenizer, train.image_shape, proxy.config.codebook_size)
    trainer = Trainer(config, params.train_tokenizer, train, proxy, root / "codes", torch.device("cpu"), seed=seed)
    trainer.fit()
    assert [row["step"] for row in trainer.history.rows][-1] == trainer.total
    project.run("train_tokenizer")
    saved = load_model_file(root / "tokenizer" / "tokenizer.pt", "tokenizer")["weights"]["tokenizer"]
    assert _same_weights(saved, trainer.tokenizer)


def test_pixel_head_pipeline_decodes_without_the_proxy(tmp_path, fashion_dir):
    """decoder_head: pixels: stage 1 regresses I'_i, stage 2 tunes only the tokenizer's decoder, and
    the saved codec decodes to images whatever the proxy's weights are."""
    from spectralar.artifacts import load_codec

    project = Project(tmp_path, fashion_dir, {"tokenizer.decoder_head": "pixels",
                                              "tokenizer.position_init": "sincos",
                                              "tokenizer.band_limited_output": True})
    metrics = project.run_all()
    assert metrics["decode"] == "pixels" and len(metrics["psnr_prefix"]) == 8
    header = (tmp_path / "tokenizer" / "history.csv").read_text().splitlines()[0].split(",")
    assert "l2" in header and "ce" not in header
    codec = load_codec(tmp_path / "tokenizer" / "tokenizer.pt", "cpu")
    ids = torch.randint(0, 32, (2, 8))
    before = codec.decode(ids)
    assert before.shape == (2, 1, 32, 32) and before.abs().max() <= 1
    with torch.no_grad():
        for p in codec.proxy.parameters():
            p.add_(1.0)
    torch.testing.assert_close(codec.decode(ids), before)


def test_patch_size_binds_to_the_proxy_grid_only_for_the_proxy_code_head(tmp_path, fashion_dir):
    """The proxy-code head predicts one proxy code per patch, so its patch grid must be the proxy's
    code grid; the pixel head regresses pixels and may use any patch size that divides the image;
    the encoder's own patch size (encoder_patch_size) is free with either head."""
    from spectralar.config import ConfigError

    (tmp_path / "pixels").mkdir(), (tmp_path / "codes").mkdir()
    pixels = Project(tmp_path / "pixels", fashion_dir, {"tokenizer.patch_size": 8, "tokenizer.decoder_head": "pixels"})
    metrics = pixels.run_all()
    from spectralar.artifacts import load_codec

    saved = load_model_file(tmp_path / "pixels" / "tokenizer" / "tokenizer.pt", "tokenizer")
    assert saved["configs"]["tokenizer"]["patch_size"] == 8 and metrics["decode"] == "pixels"
    assert np.isfinite(metrics["psnr_full"])
    codec = load_codec(tmp_path / "pixels" / "tokenizer" / "tokenizer.pt", "cpu")
    assert codec.decode(torch.randint(0, 32, (2, 8))).shape == (2, 1, 32, 32)
    codes = Project(tmp_path / "codes", fashion_dir, {"tokenizer.patch_size": 8,
                                                      "tokenizer.decoder_head": "proxy_codes"})
    with pytest.raises(ConfigError, match="patch_size must equal the proxy's downsample factor"):
        codes.run_all()
    # the encoder's patches are free with either head: the decoder keeps the proxy's grid
    (tmp_path / "encoder").mkdir()
    encoder = Project(tmp_path / "encoder", fashion_dir, {"tokenizer.encoder_patch_size": 8,
                                                          "tokenizer.decoder_head": "proxy_codes"})
    metrics = encoder.run_all()
    saved = load_model_file(tmp_path / "encoder" / "tokenizer" / "tokenizer.pt", "tokenizer")
    assert (saved["configs"]["tokenizer"]["patch_size"], saved["configs"]["tokenizer"]["encoder_patch_size"]) == (4, 8)
    assert metrics["decode"] in ("soft", "argmax") and np.isfinite(metrics["psnr_full"])
    codec = load_codec(tmp_path / "encoder" / "tokenizer" / "tokenizer.pt", "cpu")
    assert codec.tokenizer.encoder.patch_position_embedding.shape[1] == 16
    assert codec.decode(torch.randint(0, 32, (2, 8))).shape == (2, 1, 32, 32)


def test_compile_trains_both_stages_through_torch_compile(tmp_path, fashion_dir, monkeypatch):
    """train_tokenizer.compile: true wraps each stage's training forward in torch.compile. The
    aot_eager backend stands in for inductor here (dynamo's capture and AOTAutograd, without the
    minutes of C++ compiling inductor needs on CPU)."""
    torch.set_num_threads(1)
    compiled, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(type(module).__name__)
                        or real(module, backend="aot_eager"))
    (tmp_path / "p").mkdir()
    metrics = Project(tmp_path / "p", fashion_dir, {"train_tokenizer.compile": True}).run_all()
    assert compiled == ["NestedSpectralTokenizer", "Stage2Reconstruction"]
    assert metrics["steps"] == 10 and all(np.isfinite(metrics["psnr_prefix"]))
    state = load_model_file(tmp_path / "p" / "tokenizer" / "tokenizer.pt", "tokenizer")
    assert not any("_orig_mod" in name for name in state["weights"]["tokenizer"])  # saved unwrapped
