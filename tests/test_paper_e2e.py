"""The paper configs end to end: every stage through the CLI (dvc.yaml's command lines, in a temporary
project), on a synthetic ImageNet-like ImageFolder, at the paper's architecture sizes (MaskGIT-VQGAN
proxy at 256 px, TiTok-B64 tokenizer with N = 64 levels, d16 generator). configs/imagenet-d16.yaml runs
prepare ... sample; then, switched to configs/imagenet-d16-p4.yaml (identical above ``generator``),
train_generator, sample, evaluate and report run with the p4 generator. So both generators train and
sample, and evaluate and report (which do not depend on tokens_per_step) run once, on the p4 samples.

What the test changes in the config files, and nothing else: step counts (1), batch sizes (1-4), sample
and evaluation-image counts (a few); the data and weight paths stay as the files write them, because the
test places the synthetic data and the stand-in weight files where the configs look for them
(``data/ILSVRC2012``, ``weights/...``) in the official layouts: MaskGIT-VQGAN's state dict (random
weights, the keys and shapes ``load_maskgit_checkpoint`` loads strictly), torchvision's VGG16 and
torch-fidelity's TF-Inception state dicts (random weights), and ADM's reference batch (``arr_0`` images,
``mu``/``sigma`` pool3 statistics). So every architecture is the paper's and every stage runs the
code a paper run runs, FID/IS/KID with the TF-Inception included (on a handful of images).

Peak memory: each stage runs in its own process, started from a small launcher (``run_measured``:
Linux counts the launching process's resident size in a child's peak); ``os.wait4`` gives its peak
resident set (the largest of the stage and its worker processes). Scaling rule for the limit: a paper
run gives each GPU process an 80 GB GPU and a share of a 256 GB host (8 GPUs: 32 GB). Here the CPU
holds what the GPU would, at a batch ``b`` where the paper uses ``B``. A stage may use what does not
depend on the batch (Python and torch, ``RUNTIME_BYTES``; its model files, five times over when it
trains them: weights, gradients, two AdamW moments and the host copy a checkpoint is written from),
plus the 80 GB of the GPU scaled by ``b / B`` for activations; and never more than the 32 GB host
share. (extract_proxy_codes used 13.3 GB at batch 1 before it encoded images x levels in device
batches, far above the ~2.7 GB this rule allows it at batch 1.) Stages without a model or a batch
(prepare, correlation, report) do host work a paper run does on the host too, at the sizes the config
sets: their limit is the 32 GB host share.

One stage analyses below 256 px, as the paper config says: correlation (Table 1's protocol, no model;
the paper cites CIFAR for Table 1) area-downsamples the 256 px val images to `correlation.resolution`
(32). Its Figure 4 map correlates each of the C·H·W elements of t_4 with the 3·C·H·W earlier ones: at
256 px that is 196,608 x 589,824 products per image in 4.8 GB float64 blocks, whatever the number of
images (stopped after 12 minutes at 13.6 GB resident on this 2-core, 23 GB machine, before the config
had a resolution).

Time: on 2 CPU cores the run is dominated by the N = 64 levels at 256 px: extract_proxy_codes encodes
every training image 64 times with the MaskGIT encoder, and train_tokenizer's and evaluate's
per-prefix PSNR decode each evaluation image from 64 prefixes through the tokenizer and the MaskGIT
decoder. Those counts are the paper's (N = 64), so the test keeps them. Measured: 17 minutes on 2 cores
under light load (2026-12-01), 33 minutes on a slower AVX2 machine with both trainers compiled by
inductor (2026-12-03: evaluate 537 s, train_tokenizer 487 s, extract_proxy_codes 303 s, each sample
196-211 s); the README has every stage's time and peak memory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import REPO
from tests.test_extract_proxy_codes import run_measured

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.paper]  # not in `make test` (17-33 min on 2 cores): `make test-paper`

CLASSES = ("n01440764", "n01443537")  # ImageNet wnids: the official train/<wnid>/*.JPEG layout
TRAIN_PER_CLASS, VAL_PER_CLASS = 1, 5  # correlation needs 10 val images

# Only step counts, batch sizes and sample / evaluation-image counts change (module docstring).
REDUCED = {
    "train_proxy": {"batch_size": 1, "eval_images": 1},
    "extract_proxy_codes": {"batch_size": 4},
    "train_tokenizer": {"batch_size": 1, "micro_batch_size": 1, "stage1_steps": 1, "stage2_steps": 1, "warmup_steps": 0,
                        "stage2_warmup_steps": 0, "adversarial_start_step": 0, "checkpoint_every": 1,
                        "log_every": 1, "eval_images": 1},
    "train_evalnet": {"epochs": 1, "batch_size": 2},
    "reference_stats": {"num_images": 4, "batch_size": 2},
    "correlation": {"num_images": 10},
    "dump_tokens": {"batch_size": 2},
    "train_generator": {"batch_size": 2, "steps": 1, "warmup_steps": 0, "checkpoint_every": 1, "log_every": 1,
                        "val_images": 2},
    # progression_samples 0: its figure decodes each shown sample from all 64 prefixes (64 decodes at 256 px)
    "sample": {"num_per_class": 2, "batch_size": 4, "progression_samples": 0, "superres_samples": 1},
    "evaluate": {"batch_size": 4, "reconstruction_images": 2, "psnr_images": 1, "kid_subset_size": 2},
}
D16_GENERATOR_STAGES = ("train_generator", "sample")  # what tokens_per_step changes; evaluate and report run once
P4_STAGES = ("train_generator", "sample", "evaluate", "report")

GiB = 1 << 30
GPU_BYTES, HOST_SHARE_BYTES = 80 * 10**9, 256 * 10**9 // 8
RUNTIME_BYTES = 2 * GiB  # Python, torch, torchvision, torch-fidelity, the allocator's slack
# Per stage: (batch key in its section, model files it loads, the ones it trains).
MODELS = {
    "prepare": (None, [], []),
    "train_proxy": ("train_proxy.batch_size", ["weights/maskgit-vqgan-imagenet-f16-256.bin"], []),
    "extract_proxy_codes": ("extract_proxy_codes.batch_size", ["models/proxy/proxy.pt"], []),
    "train_tokenizer": ("train_tokenizer.batch_size", ["models/proxy/proxy.pt", "weights/vgg16-397923af.pth"],
                        ["models/tokenizer/tokenizer.pt", "models/proxy/proxy.pt"]),
    "train_evalnet": ("train_evalnet.batch_size", [], ["models/evalnet/evalnet.pt"]),
    "reference_stats": ("reference_stats.batch_size", ["models/evalnet/evalnet.pt"], []),
    "correlation": (None, [], []),
    "dump_tokens": ("dump_tokens.batch_size", ["models/tokenizer/tokenizer.pt"], []),
    "train_generator": ("train_generator.batch_size", [], ["models/generator/generator.pt"]),
    "sample": ("sample.batch_size", ["models/generator/generator.pt", "models/tokenizer/tokenizer.pt"], []),
    "evaluate": ("evaluate.batch_size", ["models/tokenizer/tokenizer.pt", "models/evalnet/evalnet.pt",
                                         "weights/weights-inception-2015-12-05-6726825d.pth"], []),
    "report": (None, [], []),
}


# --------------------------------------------------------------------------------------------
# The synthetic ImageNet and the stand-in weight files
# --------------------------------------------------------------------------------------------

def _photo(rng: np.random.Generator, label: int, height: int, width: int) -> Image.Image:
    """A photo-like RGB image: a smooth class-coloured gradient, a bright square and noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    colour = np.array([[200, 60, 40], [40, 90, 210]][label % 2], dtype=np.float64)
    image = colour * (0.5 + 0.5 * np.sin(6 * x + 3 * y + label))[..., None]
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top:top + height // 3, left:left + width // 3] = 240
    image += rng.normal(0, 12, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_imagenet(root: Path, seed: int = 0) -> None:
    """ILSVRC-2012's layout: train/<wnid>/<wnid>_<n>.JPEG and val/<wnid>/*.JPEG, larger than 256 px."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for index in range(count):
                _photo(rng, label, 300, 400).save(folder / f"{wnid}_{index}.JPEG", quality=90)


def make_weights(project: Path, params: dict) -> None:
    """Random-weight stand-ins, in the official file layouts, where the config's paths point."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchvision.models import vgg16

    from spectralar.models.proxy_vq import ProxyConfig, ProxyVQModel

    torch.manual_seed(0)
    files = {params["train_proxy"]["checkpoint"]: lambda: ProxyVQModel(ProxyConfig.maskgit_imagenet()).state_dict(),
             params["train_tokenizer"]["perceptual_weights"]: lambda: vgg16(weights=None).state_dict()}
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load"), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # build it without its weights
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    files[params["evaluate"]["inception_weights"]] = inception.state_dict
    assert params["reference_stats"]["inception_weights"] == params["evaluate"]["inception_weights"]
    for relative, state in files.items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state(), project / relative)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 2048))
    np.savez(project / params["reference_stats"]["adm_reference"],
             arr_0=rng.integers(0, 256, size=(8, 256, 256, 3), dtype=np.uint8),
             mu=features.mean(0).astype(np.float32), sigma=np.cov(features, rowvar=False).astype(np.float32))


def paper_params(config: Path) -> dict:
    """A paper config with only the REDUCED knobs changed (every other key, sizes included, as written)."""
    params = yaml.safe_load(config.read_text())
    for section, values in REDUCED.items():
        unknown = set(values) - set(params[section])
        assert not unknown, (section, unknown)
        params[section].update(values)
    return params


# --------------------------------------------------------------------------------------------
# Running stages
# --------------------------------------------------------------------------------------------

def dvc_commands() -> dict[str, list[str]]:
    """Each stage's command line exactly as dvc.yaml runs it (relative paths, from the project root)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        assert argv[:3] == ["python", "-m", "spectralar"], stage["cmd"]
        commands[name] = [sys.executable, *argv[1:]]
    return commands


def run_stage(project: Path, command: list[str]) -> dict:
    """Run one stage's command in ``project``; its wall time and peak resident bytes."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SPECTRALAR_TRACKING="0")
    started = time.perf_counter()
    code, output, peak = run_measured(command, project, env)
    assert code == 0, f"{command[3]} failed:\n{output[-5000:]}"
    return {"seconds": round(time.perf_counter() - started, 1), "peak_bytes": peak}


def memory_limit(project: Path, params: dict, stage: str) -> int:
    """The module docstring's scaling rule for ``stage``'s peak resident bytes."""
    batch_key, loaded, trained = MODELS[stage]
    models = sum((project / path).stat().st_size for path in loaded)
    models += 5 * sum((project / path).stat().st_size for path in trained)
    if batch_key is None:
        return HOST_SHARE_BYTES  # host-only work, the same at the paper's size (module docstring)
    section, key = batch_key.split(".")
    paper = yaml.safe_load((REPO / "configs" / "imagenet-d16.yaml").read_text())[section][key]
    activations = GPU_BYTES * params[section][key] // paper
    return min(HOST_SHARE_BYTES, RUNTIME_BYTES + models + activations)


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------

def _keep(usage: dict) -> None:
    """Write the usage table so far where SPECTRALAR_E2E_USAGE says, if it does (the README quotes it)."""
    if os.environ.get("SPECTRALAR_E2E_USAGE"):
        Path(os.environ["SPECTRALAR_E2E_USAGE"]).write_text(json.dumps(usage, indent=1))


def _write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_paper_configs_run_every_stage_to_the_report(tmp_path):
    project = tmp_path / "project"
    d16 = paper_params(REPO / "configs" / "imagenet-d16.yaml")
    make_imagenet(project / d16["data"]["imagefolder_root"])
    make_weights(project, d16)
    commands = dvc_commands()
    usage: dict[str, dict] = {}

    def record(label: str, command: list[str], params: dict, stage: str) -> None:
        usage[label] = {**run_stage(project, command), "limit_bytes": memory_limit(project, params, stage)}
        _keep(usage)

    _write_params(project, d16)
    for stage in [name for name in commands if name not in P4_STAGES] + list(D16_GENERATOR_STAGES):
        record(stage, commands[stage], d16, stage)
    p4 = paper_params(REPO / "configs" / "imagenet-d16-p4.yaml")
    _write_params(project, p4)  # `make use-config`: the generator stages again, with the p4 generator
    for stage in P4_STAGES:
        record(f"{stage} (p4)", commands[stage], p4, stage)
    summary = "\n".join(f"{stage:26s} {row['seconds']:7.1f} s {row['peak_bytes'] / GiB:6.2f} GiB "
                        f"(limit {row['limit_bytes'] / GiB:6.2f} GiB)" for stage, row in usage.items())
    logger.info("per stage: wall time, peak resident memory\n%s", summary)

    over = {stage: row for stage, row in usage.items() if row["peak_bytes"] > row["limit_bytes"]}
    assert not over, f"stages above their memory limit:\n{summary}"
    _check_outputs(project, d16)


def _check_outputs(project: Path, params: dict) -> None:
    """What the paper sizes imply for the outputs: N = 64 tokens of a 4096 codebook, 64 proxy levels of a
    16x16 grid, 256 px samples, one per class and sample count, the p4 generator in the last run."""
    metrics = {path.stem: json.loads(path.read_text()) for path in (project / "metrics").glob("*.json")
               if not path.name.endswith(".timing.json")}
    assert set(metrics) == set(MODELS)
    codes = np.load(project / "data" / "proxy_codes" / "train.npy", mmap_mode="r")
    assert codes.shape == (len(CLASSES) * TRAIN_PER_CLASS, 64, 16 * 16) and codes.max() < 1024
    assert metrics["train_tokenizer"]["omegas"][-1] == 256 and len(metrics["train_tokenizer"]["omegas"]) == 64
    with np.load(project / "samples" / "samples.npz") as samples:
        count = params["sample"]["num_per_class"] * len(CLASSES)
        assert samples["arr_0"].shape == (count, 256, 256, 3) and samples["arr_0"].dtype == np.uint8
    generator = json.loads((project / "models" / "generator" / "config.json").read_text())
    assert generator["params"]["generator"]["tokens_per_step"] == 4 and generator["params"]["generator"]["depth"] == 16
    assert metrics["evaluate"]["fid"] is not None
    assert (project / "reports" / "report.md").is_file()
