"""bf16 autocast through the trainers' own code, on the CPU, so dtype and casting bugs show up before a GPU run.

On CUDA the tokenizer and generator trainers run their forward passes under ``spectralar.training.autocast``,
which is bf16 there and on the CPU only where ``train_*.cpu_bf16`` asks (the training forward, not the
held-out evaluations). Here that function is replaced, in every module that
imported it, by its CUDA branch with the device type taken from the tensor's device
(``torch.autocast("cpu", dtype=torch.bfloat16)``), and the stages run with ``run.device: cpu`` and their
``bf16: true`` params, so every other line is the one CUDA executes. The invariants: the autocast was
entered and produced bf16 activations (else the test would silently pass in fp32), losses stay finite,
every optimiser step sees finite float32 gradients on float32 parameters, the saved weights are float32,
and sampling gives long ids inside the vocabulary.

``test_cpu_bf16_param_*`` run the stages with the real function: ``cpu_bf16`` turns the CPU autocast on
and off. The tests marked ``cuda`` run the same steps on a GPU with the real autocast (``make gpu-check`` runs
``pytest -m cuda``); without CUDA they skip.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from spectralar.artifacts import load_generator, load_model_file, read_history
from spectralar.models.generator import GeneratorConfig, SpectralGPT
from spectralar.models.sampling import cyclic_labels, generate
from spectralar.training import distributed
from tests.conftest import TINY, make_fashion_dir, write_params
from tests.test_generator_stages import GeneratorProject

VOCAB = TINY["tokenizer.codebook_size"]
N_TOKENS = TINY["tokenizer.num_tokens"]
AUTOCAST_STAGES = ("spectralar.stages.train_tokenizer", "spectralar.stages.train_generator")


class Bf16Probe:
    """Stands in for ``spectralar.training.autocast`` and watches what bf16 does to training.

    ``autocast`` is the CUDA branch of the real function on the tensor's own device type; a global
    forward hook counts bf16 outputs of linear layers (proof that the autocast took effect); a global
    optimiser pre-step hook checks every gradient about to be applied.
    """

    def __init__(self) -> None:
        self.entries = 0  # autocast contexts entered with bf16 on
        self.bf16_linear_outputs = 0
        self.steps = 0  # optimiser steps watched
        self.checked_gradients = 0
        self.bad_gradients: list[str] = []

    def autocast(self, device, enabled: bool, cpu: bool = False):
        """The CUDA branch whatever ``cpu`` (``train_*.cpu_bf16``) says: every call the stage makes under
        ``bf16: true`` autocasts here as it would on a GPU (the held-out evaluations included)."""
        if not enabled:
            return contextlib.nullcontext()
        self.entries += 1
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def _forward_hook(self, module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Linear) and torch.is_tensor(output) and output.dtype == torch.bfloat16:
            self.bf16_linear_outputs += 1

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                self.checked_gradients += 1
                grad = parameter.grad
                if parameter.dtype != torch.float32 or grad.dtype != torch.float32:
                    self.bad_gradients.append(f"step {self.steps}: parameter {parameter.dtype}, gradient {grad.dtype}")
                elif not bool(torch.isfinite(grad).all()):
                    self.bad_gradients.append(f"step {self.steps}: non-finite gradient of shape {tuple(grad.shape)}")

    @contextlib.contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch):
        """Patch every loaded ``spectralar`` module holding the real autocast; hooks on while inside."""
        for name in AUTOCAST_STAGES:
            importlib.import_module(name)
        holders = [module for name, module in list(sys.modules.items())
                   if name.startswith("spectralar") and getattr(module, "autocast", None) is distributed.autocast]
        assert {m.__name__ for m in holders} >= set(AUTOCAST_STAGES)
        for module in holders:
            monkeypatch.setattr(module, "autocast", self.autocast)
        forward = nn.modules.module.register_module_forward_hook(self._forward_hook)
        pre_step = register_optimizer_step_pre_hook(self._pre_step_hook)
        try:
            yield self
        finally:
            forward.remove()
            pre_step.remove()
            for module in holders:
                monkeypatch.setattr(module, "autocast", distributed.autocast)

    def assert_trained_in_bf16(self, min_steps: int) -> None:
        assert self.entries > 0, "the stage never entered its bf16 autocast"
        assert self.bf16_linear_outputs > 0, "autocast was entered but no linear layer computed in bf16"
        assert self.steps >= min_steps and self.checked_gradients > 0
        assert not self.bad_gradients, self.bad_gradients[:5]


def _assert_finite_rows(rows: list[dict[str, float]]) -> None:
    assert rows, "no history rows"
    for row in rows:
        bad = {k: v for k, v in row.items() if not math.isfinite(v)}
        assert not bad, f"non-finite history values at step {row.get('step')}: {bad}"


def _assert_float32_weights(weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Saved weights stay float32 and finite (bf16 is for activations only)."""
    for model, state in weights.items():
        for key, tensor in state.items():
            if torch.is_floating_point(tensor):
                assert tensor.dtype == torch.float32, f"{model}.{key} saved as {tensor.dtype}"
                assert torch.isfinite(tensor).all(), f"{model}.{key} has non-finite values"


@pytest.fixture(scope="module")
def bf16_project(tmp_path_factory) -> GeneratorProject:
    """The tiny config with the data and proxy stages run (fp32: they do not autocast on CUDA either)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("bf16")
    fashion = make_fashion_dir(base / "fashion")
    (base / "project").mkdir()
    project = GeneratorProject(base / "project", fashion, {
        "run.device": "cpu", "train_tokenizer.bf16": True, "train_generator.bf16": True})
    for stage in ("prepare", "train_proxy", "extract_proxy_codes"):
        project.run(stage)
    return project


@pytest.fixture(scope="module")
def bf16_trained(bf16_project, tmp_path_factory):
    """train_tokenizer, dump_tokens and train_generator with the bf16 autocast on; the probes of both trainers."""
    probes = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        with Bf16Probe().active(monkeypatch) as probes["tokenizer"]:
            probes["tokenizer_metrics"] = bf16_project.run("train_tokenizer")
        bf16_project.run("dump_tokens")
        with Bf16Probe().active(monkeypatch) as probes["generator"]:
            probes["generator_metrics"] = bf16_project.run("train_generator")
    return bf16_project, probes


def test_tokenizer_trains_in_bf16_with_float32_gradients(bf16_trained):
    project, probes = bf16_trained
    steps = TINY["train_tokenizer.stage1_steps"] + TINY["train_tokenizer.stage2_steps"]
    probes["tokenizer"].assert_trained_in_bf16(min_steps=steps)  # stage 1, stage 2 and its discriminator
    _assert_finite_rows(read_history(project.root / "tokenizer" / "history.csv"))
    metrics = probes["tokenizer_metrics"]
    assert len(metrics["psnr_prefix"]) == N_TOKENS and all(math.isfinite(v) for v in metrics["psnr_prefix"])
    assert metrics["restarted_codes"] > 0  # dead-code restarts copy bf16 latents into the float32 codebook
    _assert_float32_weights(load_model_file(project.root / "tokenizer" / "tokenizer.pt", "tokenizer")["weights"])


def test_tokenizer_with_the_other_decoder_head_trains_in_bf16(bf16_trained, monkeypatch):
    """params.yaml's decoder head is one of two; the paper's configs may use the other (proxy codes vs pixels)."""
    from spectralar.cli import build_parser, run_stage

    project, _ = bf16_trained
    default = yaml.safe_load(Path(project.params).read_text())["tokenizer"]["decoder_head"]
    other = {"pixels": "proxy_codes", "proxy_codes": "pixels"}[default]
    root = project.root
    params = write_params(root / "params_other_head.yaml", {
        "data.fashion_mnist_dir": str(root.parent / "fashion"), **TINY, "run.device": "cpu",
        "train_tokenizer.bf16": True, "tokenizer.decoder_head": other})
    argv = ["train_tokenizer", "--params", params, "--metrics", root / "other_head.json", "--data", root / "prepared",
            "--proxy", root / "proxy/proxy.pt", "--codes", root / "codes", "--out", root / "tokenizer_other_head",
            "--checkpoints", root / "ck_other_head"]
    with Bf16Probe().active(monkeypatch) as probe:
        metrics = run_stage("train_tokenizer", build_parser().parse_args(list(map(str, argv))))
    probe.assert_trained_in_bf16(min_steps=TINY["train_tokenizer.stage1_steps"] + TINY["train_tokenizer.stage2_steps"])
    _assert_finite_rows(read_history(root / "tokenizer_other_head" / "history.csv"))
    assert all(math.isfinite(v) for v in metrics["psnr_prefix"])
    _assert_float32_weights(load_model_file(root / "tokenizer_other_head" / "tokenizer.pt", "tokenizer")["weights"])


def test_generator_trains_in_bf16_with_float32_gradients(bf16_trained):
    project, probes = bf16_trained
    probes["generator"].assert_trained_in_bf16(min_steps=TINY["train_generator.steps"])
    rows = read_history(project.root / "generator" / "history.csv")
    _assert_finite_rows(rows)
    assert all(0 <= row["accuracy"] <= 1 for row in rows)
    metrics = probes["generator_metrics"]
    assert math.isfinite(metrics["val_loss"]) and 0 <= metrics["val_accuracy"] <= 1  # evaluate() autocasts too
    _assert_float32_weights(load_model_file(project.root / "generator" / "generator.pt", "generator")["weights"])


def test_autocast_on_the_cpu_only_with_cpu_bf16():
    """``bf16`` alone autocasts on CUDA only; ``cpu_bf16`` extends it to the CPU; neither without ``bf16``."""
    cpu = torch.device("cpu")
    for enabled, on_cpu, expected in ((True, True, True), (True, False, False), (False, True, False), (False, False, False)):
        with distributed.autocast(cpu, enabled, on_cpu):
            assert torch.is_autocast_enabled("cpu") is expected, (enabled, on_cpu)
            if expected:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
                assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


class _LinearDtypes:
    """Counts the dtypes of every linear layer's output while active (a global forward hook)."""

    def __init__(self) -> None:
        self.counts: dict[torch.dtype, int] = {}

    @contextlib.contextmanager
    def active(self):
        def hook(module, inputs, output) -> None:
            if isinstance(module, nn.Linear) and torch.is_tensor(output):
                self.counts[output.dtype] = self.counts.get(output.dtype, 0) + 1

        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_auto_follows_the_cpu(monkeypatch, native):
    """``cpu_bf16: auto`` autocasts on the CPU exactly where it has native bf16; true and false ignore the
    CPU; CUDA autocasts whatever it says; the precision label says what :func:`autocast` does."""
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for setting, expected in ((True, True), (False, False), ("auto", native)):
        with distributed.autocast(cpu, True, setting):
            assert torch.is_autocast_enabled("cpu") is expected, setting
        assert distributed.training_precision(cpu, True, setting) == ("bf16 autocast" if expected else "float32")
        assert distributed.training_precision(cpu, False, setting) == "float32"
        assert distributed.training_precision(cuda, True, setting) == "bf16 autocast"


@pytest.mark.parametrize("text, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", False),  # AVX2 only: bf16 emulated
    ("flags\t\t: fpu avx2 avx512f avx512bw avx512vl\n", False),  # AVX-512 without its bf16 extension
    ("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # arm64 (Neoverse V1/N2, Graviton3)
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),
    ("model name\t: bf16 in a name is not a flag\nflags\t\t: fpu avx2\n", False),
])
def test_native_cpu_bf16_reads_the_cpu_flags(tmp_path, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert distributed.native_cpu_bf16(cpuinfo) is native


def test_native_cpu_bf16_without_cpuinfo_is_false(tmp_path):
    """No /proc/cpuinfo (macOS, Windows): emulated bf16 is assumed, ``auto`` trains in float32."""
    assert distributed.native_cpu_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize("cpu_bf16, native", [(True, False), (False, True), ("auto", True), ("auto", False)])
def test_cpu_bf16_param_switches_the_stages_autocast(bf16_trained, monkeypatch, caplog, cpu_bf16, native):
    """The real ``autocast`` through both trainers: ``cpu_bf16: true`` trains in bf16 on the CPU (the
    default's 1.5x speed-up where bf16 is native), ``false`` in float32, ``auto`` as the CPU's flags say
    (here replaced); the held-out generator evaluation stays float32."""
    from spectralar.cli import build_parser, run_stage

    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: native)
    expected = native if cpu_bf16 == "auto" else cpu_bf16
    project, _ = bf16_trained
    root, tag = project.root, f"cpu_bf16_{cpu_bf16}_{native}"
    params = write_params(root / f"params_{tag}.yaml", {
        "data.fashion_mnist_dir": str(root.parent / "fashion"), **TINY, "run.device": "cpu",
        "train_tokenizer.bf16": True, "train_generator.bf16": True,
        "train_tokenizer.cpu_bf16": cpu_bf16, "train_generator.cpu_bf16": cpu_bf16})
    stages = {
        "train_tokenizer": ["--data", root / "prepared", "--proxy", root / "proxy/proxy.pt", "--codes", root / "codes",
                            "--out", root / f"tokenizer_{tag}", "--checkpoints", root / f"ck_tok_{tag}"],
        "train_generator": ["--tokens", root / "tokens", "--out", root / f"generator_{tag}",
                            "--checkpoints", root / f"ck_gen_{tag}"],
    }
    for stage, paths in stages.items():
        argv = [stage, "--params", params, "--metrics", root / f"{stage}_{tag}.json", *paths]
        caplog.clear()
        with _LinearDtypes().active() as dtypes, caplog.at_level("INFO", logger="spectralar"):
            metrics = run_stage(stage, build_parser().parse_args(list(map(str, argv))))
        assert f"training in {'bf16 autocast' if expected else 'float32'} on cpu" in caplog.text, stage
        bf16_outputs = dtypes.counts.get(torch.bfloat16, 0)
        assert (bf16_outputs > 0) is expected, (stage, dtypes.counts)
        assert dtypes.counts.get(torch.float32, 0) > 0  # evaluation (PSNR, held-out loss) in float32 either way
        assert all(math.isfinite(v) for v in metrics.get("psnr_prefix", [metrics.get("val_loss", 0.0)]))


def test_sample_stage_on_the_bf16_trained_models(bf16_trained):
    """The sample stage (fp32 on CUDA too: it does not autocast) reads the bf16-trained files."""
    project, _ = bf16_trained
    project.run("sample")
    with np.load(project.root / "samples" / "samples.npz") as samples:
        ids, images = samples["ids"], samples["arr_0"]
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 1)
    assert np.issubdtype(ids.dtype, np.integer) and ids.shape == (len(images), N_TOKENS)
    assert ids.min() >= 0 and ids.max() < VOCAB


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_sampling_under_bf16_autocast_gives_ids_in_range(bf16_trained, use_kv_cache, cfg_scale):
    """A sampler run in bf16 (a speed option on GPUs) keeps its cache, guidance and draws consistent."""
    project, _ = bf16_trained
    model, _ = load_generator(project.root / "generator" / "generator.pt", "cpu")
    labels = cyclic_labels(10, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = generate(model, labels, cfg_scale=cfg_scale, top_k=5, top_p=0.9, use_kv_cache=use_kv_cache,
                       generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.long and ids.shape == (10, N_TOKENS)
    assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_block_sampling_under_bf16_autocast(use_kv_cache):
    """The p4 variant's block-causal mask path (an explicit attention mask) under bf16."""
    torch.manual_seed(0)
    config = GeneratorConfig(depth=1, width=32, heads=2, vocab_size=VOCAB, num_tokens=8, num_classes=10,
                             tokens_per_step=4)
    model = SpectralGPT(config)
    prefix = torch.randint(0, VOCAB, (4, 2))  # a partly covered first group
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = generate(model, cyclic_labels(10, 1)[:4], prefix_ids=prefix, cfg_scale=1.5, use_kv_cache=use_kv_cache,
                       generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.long and ids.shape == (4, 8) and torch.equal(ids[:, :2], prefix)
    assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB


# ------------------------------------------------------------------------------------------- CUDA


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny_generator_batch(device: torch.device, tokens_per_step: int = 1):
    from spectralar.stages.train_generator import TeacherForced

    torch.manual_seed(0)
    config = GeneratorConfig(depth=2, width=128, heads=2, vocab_size=VOCAB, num_tokens=16, num_classes=10,
                             tokens_per_step=tokens_per_step)
    model = SpectralGPT(config).to(device).train()
    ids = torch.randint(0, VOCAB, (8, 16), device=device)
    labels = torch.randint(0, 11, (8,), device=device)
    return model, TeacherForced(model), ids, labels


@pytest.mark.cuda
@needs_cuda
def test_cuda_generator_step_in_bf16_with_float32_gradients():
    device = torch.device("cuda")
    model, net, ids, labels = _tiny_generator_batch(device)
    with distributed.autocast(device, True):
        logits = net(ids, labels)
    assert logits.dtype == torch.bfloat16
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name


@pytest.mark.cuda
@needs_cuda
def test_cuda_generator_training_attention_runs_on_flash_kernels():
    """The causal (k = 1) training forward must be flash-eligible: bf16, no explicit mask. Restricting SDPA
    to the flash backend makes any fallback (an explicit mask, fp32 inputs) an error instead of a slowdown."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    model, net, ids, labels = _tiny_generator_batch(device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), distributed.autocast(device, True):
        logits = net(ids, labels)
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16


@pytest.mark.cuda
@needs_cuda
def test_cuda_tokenizer_step_in_bf16_with_float32_gradients():
    from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = TokenizerConfig(image_size=32, in_channels=1, patch_size=4, width=64, encoder_depth=1, decoder_depth=1,
                             heads=2, num_tokens=8, codebook_size=32, proxy_codebook_size=32)
    model = NestedSpectralTokenizer(config).to(device).train()
    x = torch.randn(4, 1, 32, 32, device=device)
    prefix = torch.tensor([1, 3, 5, 8], device=device)
    with distributed.autocast(device, True):
        logits, ids, vq_loss = model(x, prefix)
    assert logits.dtype == torch.bfloat16 and ids.dtype == torch.long and int(ids.max()) < config.codebook_size
    codes = torch.randint(0, 32, logits.shape[:1] + logits.shape[2:], device=device)
    loss = nn.functional.cross_entropy(logits.float(), codes) + vq_loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
