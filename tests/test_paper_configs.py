"""The paper-scale params files in configs/ (ImageNet-256, paper Table 2): complete, faithful, switchable.

Models are built on the meta device: parameter counts are exact and nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spectralar.config import SECTIONS, load_params, section_class
from spectralar.models.generator import GeneratorConfig, SpectralGPT
from spectralar.models.proxy_vq import CHECKPOINT_FILE_NAME, ProxyConfig
from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig
from spectralar.artifacts import generator_config_for, proxy_config_for, tokenizer_config_for
from tests.conftest import REPO

BIN = Path(sys.executable).parent
CONFIGS = {name: REPO / "configs" / f"imagenet-{name}.yaml" for name in ("d16", "d20", "d24", "d16-p4")}
# The only sections that may differ between the four files. Everything else is byte-identical, so the
# four runs share DVC run-cache entries for every stage but train_generator and what follows it.
GENERATOR_SECTIONS = {"generator", "train_generator"}

IMAGENET_TRAIN_IMAGES = 1_281_167
VAR_EPOCHS = {"d16": 200, "d20": 250, "d24": 350, "d16-p4": 200}  # VAR paper: 200/250/350 epochs
# (depth, tokens_per_step, published parameter count): VAR's d16 310M, d20 601M, d24 1.03B.
GENERATORS = {"d16": (16, 1, 310e6), "d20": (20, 1, 601e6), "d24": (24, 1, 1.03e9), "d16-p4": (16, 4, 310e6)}


# What the stages read from the artefacts of an ImageNet run (values flow downstream): the prepared
# manifest's image shape and classes, the proxy file's codebook, the token dump's N and vocabulary.
IMAGENET_IMAGE_SHAPE = (256, 256, 3)
IMAGENET_CLASSES = 1000


def _model_configs(params) -> tuple[ProxyConfig, TokenizerConfig, GeneratorConfig]:
    """The complete model configs of a paper run, filled in as the stages fill them in."""
    proxy = proxy_config_for(params.proxy, IMAGENET_IMAGE_SHAPE)
    tokenizer = tokenizer_config_for(params.tokenizer, IMAGENET_IMAGE_SHAPE, proxy.codebook_size)
    tokens = {"vocab": tokenizer.codebook_size, "num_tokens": tokenizer.num_tokens, "num_classes": IMAGENET_CLASSES}
    return proxy, tokenizer, generator_config_for(params.generator, tokens)


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _key_tree(node):
    return {key: _key_tree(value) for key, value in node.items()} if isinstance(node, dict) else None


def _schema_keys(raw: dict) -> dict:
    """Section -> nested key names. Sections without a fixed schema (free-form mappings such as
    ``sweeps``, whose keys are the file's own choice) count by name only."""
    tree = {}
    for name, body in raw.items():
        fixed = name not in SECTIONS or dataclasses.is_dataclass(section_class(name))
        tree[name] = _key_tree(body) if fixed else "free-form"
    return tree


def _section_blocks(text: str) -> dict[str, str]:
    """Top-level section -> its exact text (key line, body, trailing comments and blank lines)."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        match = re.match(r"([A-Za-z_]\w*):", line)
        if match:
            name = match.group(1)
            blocks[name] = ""
        if name is not None:
            blocks[name] += line
    return blocks


def _parameters(module_factory) -> int:
    with torch.device("meta"):
        model = module_factory()
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Each file on its own
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_reads_imagenet(name):
    params = load_params(CONFIGS[name])
    data = params.data
    assert (data.source, data.resolution, data.shard_format, data.max_images_per_class) == \
        ("imagefolder", 256, "jpeg", None)
    assert params.extract_proxy_codes.mode == "precomputed"
    assert params.sample.num_per_class * IMAGENET_CLASSES == 50_000
    assert (params.sample.cfg_scale, params.sample.top_k, params.sample.top_p) == (1.5, 900, 0.96)
    assert params.sample.truncate == (0, 5, 10, 15)
    assert Path(params.reference_stats.adm_reference).name == "VIRTUAL_imagenet256_labeled.npz"
    assert "inception" in params.reference_stats.extractors


@pytest.mark.parametrize("name", CONFIGS)
def test_config_has_exactly_the_sections_and_keys_of_params_yaml(name):
    """Catches drift: a section or key added to params.yaml must be added to every paper config."""
    assert _schema_keys(_raw(CONFIGS[name])) == _schema_keys(_raw(REPO / "params.yaml"))
    assert set(_raw(CONFIGS[name])) == set(SECTIONS)


def test_tokenizer_is_titok_b64_with_the_three_switches():
    params = load_params(CONFIGS["d16"])
    _, config, _ = _model_configs(params)
    assert config == TokenizerConfig.titok_b64()
    assert config.spectral_supervision and config.causal_mask and config.nonuniform_mapping
    count = _parameters(lambda: NestedSpectralTokenizer(config))
    assert count == 172_053_772  # tests/test_tokenizer.py counts the same architecture by hand
    assert abs(count / 172.05e6 - 1) < 0.005
    omegas = config.omegas
    assert (omegas[32 - 1], omegas[48 - 1], omegas[64 - 1]) == (32, 64, 256)
    eq9 = [i if i <= 32 else 2 * i - 32 if i <= 48 else 12 * i - 512 for i in range(1, 65)]
    assert list(omegas) == eq9


def test_proxy_is_maskgit_vqgan_loaded_from_a_relative_path():
    params = load_params(CONFIGS["d16"])
    proxy, tokenizer, _ = _model_configs(params)
    assert proxy == ProxyConfig.maskgit_imagenet()
    checkpoint = Path(params.train_proxy.checkpoint)
    assert checkpoint.name == CHECKPOINT_FILE_NAME and not checkpoint.is_absolute()
    assert proxy.grid_size == tokenizer.grid_size
    assert proxy.codebook_size == tokenizer.proxy_codebook_size == 1024


def test_tokenizer_training_is_titoks_two_stage_recipe():
    cfg = load_params(CONFIGS["d16"]).train_tokenizer
    assert (cfg.batch_size, cfg.stage1_steps, cfg.stage2_steps) == (256, 1_000_000, 500_000)
    assert (cfg.lr, cfg.stage2_lr, cfg.final_lr, cfg.weight_decay) == (1e-4, 1e-4, 1e-5, 1e-4)
    assert (cfg.betas, cfg.stage2_betas) == ((0.9, 0.99), (0.9, 0.999))
    assert (cfg.warmup_steps, cfg.stage2_warmup_steps, cfg.grad_clip, cfg.ema_decay) == (10_000, 5_000, 1.0, 0.999)
    assert (cfg.perceptual_network, cfg.perceptual_weight, Path(cfg.perceptual_weights).name) == \
        ("vgg16", 0.1, "vgg16-397923af.pth")
    assert (cfg.adversarial_weight, cfg.adversarial_start_step, cfg.lecam_weight) == (0.01, 20_000, 0.001)


@pytest.mark.parametrize("name", CONFIGS)
def test_generator_is_vars_with_its_parameter_count(name):
    params = load_params(CONFIGS[name])
    depth, tokens_per_step, published = GENERATORS[name]
    _, _, config = _model_configs(params)
    assert (config.depth, config.tokens_per_step) == (depth, tokens_per_step)
    assert (config.width, config.heads, config.drop_path_rate) == (None, None, None)  # VAR's derived values
    assert (config.vocab_size, config.num_tokens, config.num_classes) == (4096, 64, 1000)
    count = _parameters(lambda: SpectralGPT(config))
    assert abs(count / published - 1) < 0.03, count
    if name == "d16-p4":
        assert count == _parameters(lambda: SpectralGPT(_model_configs(load_params(CONFIGS["d16"]))[2]))
        assert config.num_steps == 16


@pytest.mark.parametrize("name", CONFIGS)
def test_generator_training_is_vars_recipe(name):
    cfg = load_params(CONFIGS[name]).train_generator
    steps_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / cfg.batch_size)  # VAR: ceil batches per epoch
    assert (cfg.batch_size, steps_per_epoch) == (768, 1669)
    assert cfg.steps == VAR_EPOCHS[name] * steps_per_epoch
    assert cfg.warmup_steps == VAR_EPOCHS[name] // 50 * steps_per_epoch
    assert cfg.peak_lr == pytest.approx(3e-4) and cfg.final_lr == pytest.approx(0.01 * cfg.peak_lr)
    assert (cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.bf16) == ((0.9, 0.95), 0.05, 2.0, True)


# --------------------------------------------------------------------------------------------
# The four files together: one tokenizer for all
# --------------------------------------------------------------------------------------------

def test_everything_but_the_generator_is_byte_identical():
    blocks = {name: _section_blocks(path.read_text()) for name, path in CONFIGS.items()}
    reference = blocks["d16"]
    assert set(reference) == set(SECTIONS)
    for name, own in blocks.items():
        assert set(own) == set(reference), name
        differing = {section for section in reference if own[section] != reference[section]}
        assert differing <= GENERATOR_SECTIONS, (name, differing)
    assert blocks["d20"]["generator"] != reference["generator"]  # the check can see a difference


# --------------------------------------------------------------------------------------------
# Switched in: both orchestrators accept each file
# --------------------------------------------------------------------------------------------

def test_make_use_config_validates_before_copying(tmp_path):
    make = ["make", "-s", "-f", str(REPO / "Makefile"), "use-config", f"VENV={BIN.parent}"]
    (tmp_path / "params.yaml").write_text("untouched\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS["d16"].read_text().replace("  lr: 1.0e-4\n", "  lr: fast\n", 1))
    result = subprocess.run(make + [f"CONFIG={bad}"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "train_tokenizer.lr: expected float, got 'fast'" in result.stderr
    assert (tmp_path / "params.yaml").read_text() == "untouched\n"
    result = subprocess.run(make + [f"CONFIG={CONFIGS['d24']}"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "params.yaml").read_bytes() == CONFIGS["d24"].read_bytes()


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", SPECTRALAR_TRACKING="0",
                DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")


@pytest.fixture
def project(tmp_path) -> Path:
    """A clone-like copy of the project (tracked and unignored files), committed in a fresh git repo."""
    dest = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in set(files):
        if (REPO / name).is_file() and not name.startswith("weights/"):  # hand-placed weights: gigabytes
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def _dvc_stage_params(project: Path) -> dict[str, dict]:
    """The params values DVC itself reads for each stage (what its run cache is keyed on)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {stage.name: {dep.def_path: dep.read_params() for dep in stage.deps
                             if isinstance(dep, ParamsDependency)}
                for stage in repo.index.stages}


def test_snakemake_and_dvc_accept_each_config_and_share_upstream_stages(project):
    per_config = {}
    for name, path in CONFIGS.items():
        shutil.copyfile(path, project / "params.yaml")
        for cmd in ([str(BIN / "snakemake"), "-n", "--cores", "1"], [str(BIN / "dvc"), "status"]):
            result = subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True)
            assert result.returncode == 0, (name, cmd, result.stdout + result.stderr)
        per_config[name] = _dvc_stage_params(project)
    reference = per_config["d16"]
    assert "train_tokenizer" in reference and "dump_tokens" in reference
    for name, stages in per_config.items():
        assert set(stages) == set(reference)
        differing = {stage for stage in stages if stages[stage] != reference[stage]}
        # Every stage but train_generator has the same DVC params in all four runs: with the same code and
        # data, DVC restores prepare ... train_tokenizer, dump_tokens from its run cache. (sample and
        # evaluate rerun anyway: their generator.pt dependency changes.)
        assert differing == (set() if name == "d16" else {"train_generator"}), (name, differing)
