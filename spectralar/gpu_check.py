"""The device check in one command: ``python -m spectralar.gpu_check --out DIR`` (``make gpu-check``).

A GPU is lent for minutes at a time, so everything worth knowing about the CUDA paths is measured in one
run of at most ``--budget`` seconds (480 by default):

  cuda_tests          the CUDA-marked tests (``pytest -m cuda``)
  tokenizer_training  tokenizer stage-1 training images/s and MFU in bf16 at TiTok-B64 size (the tokenizer
                      of configs/imagenet-*.yaml; ``bench_tokenizer --config b64``)
  generator_training  SpectralGPT-d16 training tokens/s and MFU in bf16 at 64 tokens (``bench.generator_training``)
  generator_sampling  d16 sampling images/s at 64 tokens with CFG, with and without the KV cache
                      (``bench.generator_sampling``)
  ddp                 one DistributedDataParallel step in an NCCL process group of one, gradients
                      compared with the same step without DDP
  pipeline            the whole default pipeline (dvc.yaml's stages in order, each its own process as under
                      ``dvc repro``) in a temporary copy of the project with ``run.device: cuda``, timed
  compiled_sampling   d16 sampling with ``generate(compiled=True)`` (``sample.compile``): torch.compile over
                      a static KV cache, CUDA graphs on a GPU; images/s beside the eager sampler and the
                      floor, and the seconds of tracing

Each part runs in processes of its own under its own time limit, so a crash, a hang or a timeout costs that
part only, and ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten after every part. Without a
GPU the parts that need one are skipped with the reason (the DDP step uses gloo instead of NCCL), and
``--quick`` shrinks every size to seconds to test the plumbing: its numbers are not benchmarks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from spectralar.io import TIMING_SUFFIX, timing_file, write_json, write_text
from spectralar.log import get_logger, setup_logging

log = get_logger("gpu_check")

PROJECT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = "configs/imagenet-d16.yaml"  # its tokenizer section is TiTok-B64, the paper's tokenizer
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
MIN_PART_SECONDS = 5.0  # a part with less budget left than this is skipped, not started
CFG_SCALE = 1.5  # VAR's FID setting (configs/imagenet-*.yaml, sample.cfg_scale)


# ------------------------------------------------------------------------------------------------
# Sizes and parts
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each benchmark runs. FULL is the paper's scale; QUICK is seconds on a CPU."""

    tokenizer_config: str  # bench_tokenizer's --config: "b64" (TiTok-B64) or "default" (params.yaml)
    tokenizer_batch: int
    generator: str  # "d16" (GeneratorConfig.d16: 64 tokens, 4096 codes, 1000 classes) or "tiny"
    generator_batch: int
    sample_batch: int  # images per sampling call (CFG doubles the forward batch)
    steps: int
    warmup: int
    sample_repeats: int

    def generator_config(self):
        from spectralar.models.generator import GeneratorConfig

        if self.generator == "d16":
            return GeneratorConfig.d16()
        return GeneratorConfig(depth=2, width=64, heads=2, vocab_size=256, num_tokens=16, num_classes=10)


FULL = Sizes("b64", 64, "d16", 256, 250, 10, 3, 2)
QUICK = Sizes("default", 2, "tiny", 4, 4, 1, 1, 1)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str  # a row of the markdown table
    limit_s: float  # full mode; quick mode uses quick_limit_s
    quick_limit_s: float


PARTS = (
    Part("cuda_tests", "CUDA-marked tests (pytest -m cuda)", 120, 60),
    Part("tokenizer_training", "tokenizer training", 60, 60),
    Part("generator_training", "generator training", 60, 60),
    Part("generator_sampling", "generator sampling", 75, 60),
    Part("ddp", "DDP step, process group of one", 60, 60),
    Part("pipeline", "default pipeline in a temporary copy", 420, 150),
    # Last, so its tracing never takes the pipeline's time: what `sample.compile: true` would give.
    Part("compiled_sampling", "generator sampling, compiled (static KV cache; CUDA graphs on a GPU)", 120, 60),
)
PART_NAMES = tuple(part.name for part in PARTS)

# What each part imports beyond torch, numpy and PyYAML, by module name -> the distribution pinned in
# requirements.txt. A GPU machine without network may have a PyTorch of its own but not the project's
# pins: the check names what is missing before it starts, instead of a part failing minutes in.
# `cuda_tests` collects every test module (pytest imports them all to find the marked tests); timm is
# only the reference of tests/test_vit.py, which skips without it. The model parts need torch alone,
# the tokenizer's scipy too: it reads params.yaml, whose loader imports every stage's config class, and
# the correlation stage's module imports scipy.
_PIPELINE = {"torchvision": "torchvision", "PIL": "pillow", "torch_fidelity": "torch-fidelity", "scipy": "scipy",
             "matplotlib": "matplotlib"}
PART_NEEDS: dict[str, dict[str, str]] = {
    "cuda_tests": {**_PIPELINE, "pytest": "pytest"},
    "tokenizer_training": {"scipy": "scipy"},
    "pipeline": _PIPELINE,
}
# Imported if present: without MLflow every stage warns once and runs untracked (timings a little shorter).
OPTIONAL = {"mlflow": "mlflow"}


@dataclasses.dataclass
class Options:
    out: Path
    quick: bool = False
    device: str = "auto"  # auto | cpu | cuda
    budget_s: float = 480.0
    parts: tuple[str, ...] = PART_NAMES
    limits: dict[str, float] = dataclasses.field(default_factory=dict)  # per-part overrides, seconds
    pipeline_params: Optional[Path] = None  # params file for the pipeline copy (default: the project's)
    pipeline_until: Optional[str] = None  # run only this stage and those it depends on (default: every stage)
    project: Path = PROJECT
    keep_workdir: bool = False

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL


# ------------------------------------------------------------------------------------------------
# Processes with a time limit
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Finished:
    returncode: Optional[int]  # None: killed at the time limit
    seconds: float
    output: str  # stdout and stderr together

    @property
    def tail(self) -> str:
        return self.output[-3000:]


def run_limited(command: list[str], limit_s: float, *, cwd: Path, env: Optional[dict] = None,
                log_file: Optional[Path] = None) -> Finished:
    """Run ``command`` in a session of its own; past ``limit_s`` the whole process group is killed
    (a stage's or pytest's children too), so a hung part never outlives its limit."""
    begin = time.perf_counter()
    with tempfile.TemporaryFile("w+") as capture:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=capture, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            returncode: Optional[int] = process.wait(timeout=max(limit_s, 0.01))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        capture.seek(0)
        output = capture.read()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(output)
    return Finished(returncode, round(time.perf_counter() - begin, 2), output)


def _child_env() -> dict:
    """The environment of every process a part starts: never a parent's MLflow run, DVC root or
    torchrun relaunch (the copy of the pipeline is a project of its own)."""
    env = dict(os.environ)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "SPECTRALAR_PARENT_RUN_ID", "SPECTRALAR_NPROC_PER_NODE"):
        env.pop(name, None)
    env.setdefault("PYTHONHASHSEED", "0")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


# ------------------------------------------------------------------------------------------------
# Benchmarks: each runs in a child process (`--part NAME`) and returns a dict
# ------------------------------------------------------------------------------------------------

def _precision(device) -> str:
    return "bf16 autocast" if device.type == "cuda" else "fp32 (the check autocasts on CUDA only)"


def b64_config_difference(project: Path = PROJECT) -> list[str]:
    """Fields where ``TokenizerConfig.titok_b64()`` (what ``bench_tokenizer --config b64`` builds) differs
    from the tokenizer that configs/imagenet-d16.yaml trains; empty when they agree."""
    from spectralar.artifacts import tokenizer_config_for
    from spectralar.config import load_params
    from spectralar.models.tokenizer import TokenizerConfig

    params = load_params(project / PAPER_CONFIG)
    paper = tokenizer_config_for(params.tokenizer, (params.data.resolution, params.data.resolution, 3),
                                 params.proxy.codebook_size)
    bench = TokenizerConfig.titok_b64()
    return [f"{f.name}: bench {getattr(bench, f.name)!r}, {PAPER_CONFIG} {getattr(paper, f.name)!r}"
            for f in dataclasses.fields(TokenizerConfig) if getattr(bench, f.name) != getattr(paper, f.name)]


def tokenizer_training(sizes: Sizes, device_name: str) -> dict:
    from spectralar.bench import bench_tokenizer
    from spectralar.training import resolve_device

    device = resolve_device(device_name)
    args = argparse.Namespace(config=sizes.tokenizer_config, params=str(PROJECT / "params.yaml"), device=str(device),
                              batch=sizes.tokenizer_batch, steps=sizes.steps, warmup=sizes.warmup)
    result = bench_tokenizer(args)
    difference = b64_config_difference()
    return {**result, "precision": _precision(device), "b64_matches_paper_config": not difference,
            "b64_differences": difference}


def generator_training(sizes: Sizes, device_name: str) -> dict:
    from spectralar import bench
    from spectralar.stages.common import stage_device

    device = stage_device(device_name)  # TF32 matmuls on CUDA, as in the stage
    config = sizes.generator_config()
    result = bench.generator_training(config, device, batch=sizes.generator_batch, steps=sizes.steps,
                                      warmup=sizes.warmup, bf16=True)
    return {**result, "config": sizes.generator, "num_tokens": config.num_tokens, "precision": _precision(device),
            "device_name": _device_name(device)}


def generator_sampling(sizes: Sizes, device_name: str, compiled: bool = False) -> dict:
    """d16 sampling as the sample stage runs it; ``compiled``: ``generate(compiled=True)`` (``sample.compile``)
    beside the eager cached sampler and the floor, without the slow full-recompute reference."""
    from spectralar import bench
    from spectralar.stages.common import stage_device

    device = stage_device(device_name)
    result = bench.generator_sampling(sizes.generator_config(), device, batch=sizes.sample_batch,
                                      repeats=sizes.sample_repeats, cfg_scale=CFG_SCALE,
                                      recompute_repeats=0 if compiled else 1, compiled=compiled)
    result |= {"config": sizes.generator, "cfg_scale": CFG_SCALE, "device_name": _device_name(device),
               "precision": "fp32/TF32 (the sample stage does not autocast)"}
    if compiled:
        from torch._dynamo.utils import counters  # this child process compiled nothing else

        result["mode"] = "reduce-overhead (CUDA graphs)" if device.type == "cuda" else "default (inductor)"
        # Whether the trace held: graph breaks, the graphs dynamo made (recompiles add to them), and the
        # compiled functions inductor ran without a CUDA graph (it skips one on a mutated input, say)
        result |= {"graph_breaks": sum(counters["graph_break"].values()),
                   "unique_graphs": counters["stats"]["unique_graphs"],
                   "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    return result


def ddp_step(sizes: Sizes, device_name: str) -> dict:
    """One training step of the generator wrapped in DistributedDataParallel, as train_generator wraps it,
    in a process group of one (NCCL on CUDA, gloo on the CPU), against the same step without DDP.

    train_generator itself joins a process group only with WORLD_SIZE > 1, so on a one-GPU machine this is
    the only way NCCL runs: group start, DDP's parameter broadcast, the gradient all-reduce hooks."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from spectralar.models.generator import SpectralGPT
    from spectralar.stages.train_generator import TeacherForced
    from spectralar.training import autocast, build_adamw, init_distributed, synchronize

    context = init_distributed(device_preference=device_name)  # binds cuda:LOCAL_RANK; no group for one process
    device = context.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend, init_method="env://", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        torch.manual_seed(0)
        config = dataclasses.replace(sizes.generator_config(), drop_path_rate=0.0)  # same forward in both copies
        model = SpectralGPT(config).to(device).train()
        reference = copy.deepcopy(model)
        net = nn.parallel.DistributedDataParallel(TeacherForced(model),
                                                  device_ids=[device] if device.type == "cuda" else None)
        generator = torch.Generator().manual_seed(0)
        ids_BN = torch.randint(0, config.vocab_size, (sizes.generator_batch, config.num_tokens), generator=generator)
        labels_B = torch.randint(0, config.num_classes + 1, (sizes.generator_batch,), generator=generator)
        ids_BN, labels_B = ids_BN.to(device), labels_B.to(device)

        def loss_of(module: nn.Module) -> torch.Tensor:
            with autocast(device, True):
                logits_BNV = module(ids_BN, labels_B)
            return F.cross_entropy(logits_BNV.float().flatten(0, 1), ids_BN.flatten())

        optimizer = build_adamw(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        begin = time.perf_counter()
        loss = loss_of(net)
        loss.backward()
        optimizer.step()
        synchronize(device)
        step_seconds = time.perf_counter() - begin
        loss_of(TeacherForced(reference)).backward()
        difference, scale = 0.0, 0.0
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if p.grad is not None:
                difference = max(difference, float((p.grad - q.grad).abs().max()))
                scale = max(scale, float(q.grad.abs().max()))
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        if not torch.isfinite(loss) or difference > 1e-4 * max(scale, 1e-12) or float(total) != 1.0:
            raise AssertionError(f"DDP step disagrees: loss {float(loss)}, max gradient difference {difference} "
                                 f"(largest gradient {scale}), all_reduce of 1 over one rank gave {float(total)}")
        nccl = torch.cuda.nccl.version() if backend == "nccl" else None  # a tuple (2, 21, 5), or an int in old torch
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        return {"backend": backend, "world_size": dist.get_world_size(), "nccl_version": nccl,
                "device": str(device), "device_name": _device_name(device), "config": sizes.generator,
                "batch": sizes.generator_batch, "loss": round(float(loss), 4),
                "max_gradient_difference": difference, "largest_gradient": scale,
                "first_step_seconds": round(step_seconds, 3)}
    finally:
        dist.destroy_process_group()


BENCHMARKS: dict[str, Callable[[Sizes, str], dict]] = {
    "tokenizer_training": tokenizer_training,
    "generator_training": generator_training,
    "generator_sampling": generator_sampling,
    "ddp": ddp_step,
    "compiled_sampling": functools.partial(generator_sampling, compiled=True),
}


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_benchmark_part(name: str, options: Options, device: str, limit_s: float) -> dict:
    """A benchmark in its own process (``--part``): a crash or a CUDA hang stays there."""
    result_file = options.out / f".{name}.result.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "spectralar.gpu_check", "--out", str(options.out), "--part", name,
               "--device", device, "--result", str(result_file)] + (["--quick"] if options.quick else [])
    finished = run_limited(command, limit_s, cwd=options.project, env=_child_env(),
                           log_file=options.out / "logs" / f"{name}.log")
    if finished.returncode is None:
        return {"status": "timeout", "note": f"killed at its {limit_s:.0f} s limit", "tail": finished.tail}
    if finished.returncode != 0 or not result_file.is_file():
        return {"status": "failed", "note": _last_line(finished.output), "tail": finished.tail}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return {"status": "ok", "result": result}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------------------------------
# Parts that start their own processes: the CUDA tests and the pipeline
# ------------------------------------------------------------------------------------------------

def cuda_tests(options: Options, device: str, limit_s: float) -> dict:
    if device != "cuda":
        return {"status": "skipped", "note": f"no CUDA device (device {device}): the CUDA-marked tests need one"}
    report = options.out / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests"]
    finished = run_limited(command, limit_s, cwd=options.project, env=_child_env(),
                           log_file=options.out / "logs" / "cuda_tests.log")
    if finished.returncode is None:
        return {"status": "timeout", "note": f"killed at its {limit_s:.0f} s limit", "tail": finished.tail}
    counts = junit_counts(report) if report.is_file() else {}
    if finished.returncode != 0 or not counts.get("passed"):
        failing = ", ".join(counts.get("failing", [])[:5]) or _last_line(finished.output)
        return {"status": "failed", "note": f"pytest exit {finished.returncode}: {failing}", "tail": finished.tail,
                "result": counts}
    return {"status": "ok", "result": counts}


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped counts and failing test ids of a pytest JUnit XML report."""
    failing, skipped, total = [], 0, 0
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
    return {"passed": total - len(failing) - skipped, "failed": len(failing), "skipped": skipped, "failing": failing}


# Not copied into the pipeline's temporary project: at its top, outputs, caches, tracking stores,
# environments (spectralar/data and spectralar/models are code: only the top level is filtered); anywhere,
# bytecode and the timing files of earlier runs (the stage table's timings are this run's).
_NOT_COPIED = {".git", ".venv", ".dvc", ".snakemake", ".spectralar", ".pytest_cache", "data", "models", "runs", "logs",
               "plots", "samples", "mlruns", "mlartifacts", "mlflow.db", "mlflow.db.lock", "weights"}


def copy_project(source: Path, destination: Path) -> None:
    """The project's code, declarations and params, without its outputs; ``weights/`` (hand-placed
    files, possibly large) is linked rather than copied."""
    source = source.resolve()

    def ignored(folder: str, names: list[str]) -> list[str]:
        top = Path(folder).resolve() == source
        return [n for n in names if n == "__pycache__" or n.endswith(TIMING_SUFFIX) or (top and n in _NOT_COPIED)]

    shutil.copytree(source, destination, ignore=ignored)
    if (source / "weights").is_dir():
        (destination / "weights").symlink_to((source / "weights").resolve())


def synthetic_fashion_mnist(directory: Path, train: int = 60_000, val: int = 10_000, seed: int = 0) -> Path:
    """Idx files in Fashion-MNIST's layout and size (28x28 noise with a class-dependent bar), for a machine
    without Debian's dataset: the pipeline's timings hold, its quality metrics mean nothing."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", val)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        for label in range(10):
            images[labels == label, 4 + 2 * label: 8 + 2 * label, 4:24] = 200
        for name, array, magic in ((f"{prefix}-images-idx3-ubyte.gz", images, 2051),
                                   (f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)):
            header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.GzipFile(directory / name, "wb", compresslevel=1, mtime=0) as handle:
                handle.write(header + array.tobytes())
    return directory


def _pipeline_params(options: Options, device: str, workdir: Path) -> tuple[dict, list[str]]:
    """The copy's params: the chosen file with ``run.device`` set; Fashion-MNIST replaced by a synthetic
    stand-in of the same size when the machine lacks it."""
    notes = []
    source = options.pipeline_params or options.project / "params.yaml"
    params = yaml.safe_load(Path(source).read_text())
    params["run"]["device"] = device
    data = params["data"]
    images = Path(data["fashion_mnist_dir"]) / "train-images-idx3-ubyte.gz"
    if data["source"] == "fashion_mnist" and not images.is_file():
        data["fashion_mnist_dir"] = str(synthetic_fashion_mnist(workdir / "fashion-mnist"))
        notes.append("Fashion-MNIST missing: a synthetic stand-in of the same size (timings only)")
    return params, notes


def _with_upstream(dag, stage: str) -> set[str]:
    from spectralar.dag import upstream

    if stage not in dag:
        raise ValueError(f"--pipeline-until {stage!r}: not a stage of dvc.yaml ({', '.join(dag)})")
    found, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(upstream(dag, name))
    return found


def stage_timing(project: Path, spec) -> dict[str, float]:
    """The numbers in a stage's timing file (``metrics/<stage>.timing.json``: the telemetry ``cli.run_stage``
    splits from its metrics) but the stage's seconds, which the table has: images/s, tokens/s, MFU,
    feature extraction's images/s, train seconds, a resume point."""
    timing = {}
    for metrics in spec.metrics:
        path = project / timing_file(metrics)
        found = json.loads(path.read_text()) if path.is_file() else {}
        timing |= {key: value for key, value in found.items()
                   if key != "stage_seconds" and isinstance(value, (int, float))}
    return timing


def pipeline(options: Options, device: str, limit_s: float) -> dict:
    """dvc.yaml's stages in dependency order, each command run as DVC runs it, in a fresh copy."""
    from spectralar.dag import load_dag, topological_order

    if options.quick and options.pipeline_params is None:
        return {"status": "skipped", "note": "quick mode runs the pipeline only with --pipeline-params (a tiny "
                                             "params file); the default takes about 11 min on 2 CPU cores"}
    deadline = time.perf_counter() + limit_s
    workdir = Path(tempfile.mkdtemp(prefix="spectralar-gpu-check-"))
    try:
        project = workdir / "project"
        copy_project(options.project, project)
        params, notes = _pipeline_params(options, device, workdir)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dag = load_dag(project / "dvc.yaml")
        wanted = _with_upstream(dag, options.pipeline_until) if options.pipeline_until else set(dag)
        stages, begin = [], time.perf_counter()
        for name in (name for name in topological_order(dag) if name in wanted):
            command = shlex.split(dag[name].cmd)
            if command[0] == "python":
                command[0] = sys.executable
            finished = run_limited(command, deadline - time.perf_counter(), cwd=project, env=_child_env(),
                                   log_file=options.out / "logs" / "pipeline" / f"{name}.log")
            stages.append({"stage": name, "seconds": finished.seconds, "returncode": finished.returncode,
                           "timing": stage_timing(project, dag[name]) if finished.returncode == 0 else {}})
            if finished.returncode != 0:
                status = "timeout" if finished.returncode is None else "failed"
                what = f"killed at the {limit_s:.0f} s limit" if status == "timeout" else _last_line(finished.output)
                return {"status": status, "note": "; ".join(notes + [f"stage {name}: {what}"]), "tail": finished.tail,
                        "result": {"stages": stages, "device": device}}
        result = {"stages": stages, "device": device, "total_seconds": round(time.perf_counter() - begin, 1),
                  "params": str(options.pipeline_params or "params.yaml"), "until": options.pipeline_until,
                  "metrics_files": sorted(p.name for p in (project / "metrics").glob("*.json")
                                          if not p.name.endswith(".timing.json"))}
        return {"status": "ok", "note": "; ".join(notes), "result": result}
    finally:
        if options.keep_workdir:
            log.info("pipeline copy kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The check: parts in order, results after each
# ------------------------------------------------------------------------------------------------

def _resolve_device(preference: str) -> str:
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return preference


def _gpu_description() -> Optional[str]:
    """nvidia-smi's name, memory and driver (without creating a CUDA context in this process)."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip().replace("\n", "; ") or None if found.returncode == 0 else None


def pinned_versions(requirements: Path = PROJECT / "requirements.txt") -> dict[str, str]:
    """requirements.txt's ``name==version`` lines."""
    pins = {}
    for line in (requirements.read_text().splitlines() if requirements.is_file() else []):
        name, separator, version = line.split("#")[0].strip().partition("==")
        if separator:
            pins[name.lower()] = version
    return pins


def _installed(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_modules(parts: tuple[str, ...]) -> dict[str, str]:
    """Modules the selected parts import that this Python cannot find: module -> distribution ``==`` pin."""
    pins = pinned_versions()
    needed = {module: dist for part in parts for module, dist in PART_NEEDS.get(part, {}).items()}
    return {module: f"{dist}=={pins[dist]}" if dist in pins else dist
            for module, dist in sorted(needed.items()) if importlib.util.find_spec(module) is None}


def package_versions() -> dict[str, dict[str, Optional[str]]]:
    """The installed and pinned version of torch and of every distribution a part imports."""
    pins = pinned_versions()
    names = ["torch", "numpy", *sorted({d for needs in PART_NEEDS.values() for d in needs.values()} | set(OPTIONAL.values()))]
    return {name: {"installed": _installed(name), "pinned": pins.get(name)} for name in names}


def _meta(options: Options, device: str) -> dict:
    import torch

    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "quick" if options.quick else "full", "device": device, "gpu": _gpu_description(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host_cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "budget_s": options.budget_s, "sizes": dataclasses.asdict(options.sizes), "packages": package_versions()}


def run_check(options: Options) -> dict:
    """Every selected part in order, each within min(its limit, the budget left); the JSON and markdown
    are rewritten after each, so a check cut short still leaves every finished part's result."""
    missing = missing_modules(options.parts)
    if missing:
        raise SystemExit(f"gpu_check: this Python ({sys.executable}) lacks what the parts import: "
                         f"{', '.join(sorted(set(missing.values())))} (requirements.txt's pins; torch-fidelity is "
                         f"pure Python: pip install --no-deps). Or leave out the parts that need them with --parts.")
    options.out.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(options.device)
    report = {"meta": _meta(options, device), "parts": []}
    begin = time.perf_counter()
    for part in PARTS:
        if part.name not in options.parts:
            continue
        limit = options.limits.get(part.name, part.quick_limit_s if options.quick else part.limit_s)
        left = options.budget_s - (time.perf_counter() - begin)
        record: dict[str, Any] = {"part": part.name, "limit_s": round(min(limit, left), 1)}
        if left < min(MIN_PART_SECONDS, limit):
            record |= {"status": "skipped", "note": f"budget spent ({options.budget_s:.0f} s)"}
        else:
            log.info("%s: up to %.0f s", part.name, min(limit, left))
            runner = {"cuda_tests": cuda_tests, "pipeline": pipeline}.get(part.name)
            started = time.perf_counter()
            try:
                record |= runner(options, device, min(limit, left)) if runner else \
                    run_benchmark_part(part.name, options, device, min(limit, left))
            except Exception as err:  # a bug in the check itself: recorded, the other parts still run
                log.exception("%s failed", part.name)
                record |= {"status": "failed", "note": f"{type(err).__name__}: {err}"}
            record["seconds"] = round(time.perf_counter() - started, 1)  # process starts included
        record.setdefault("seconds", 0.0)
        record.setdefault("note", "")
        log.info("%s: %s in %.1f s %s", part.name, record["status"], record["seconds"], record["note"])
        report["parts"].append(record)
        report["meta"] |= {"elapsed_s": round(time.perf_counter() - begin, 1),
                           "load_average_end": [round(x, 2) for x in os.getloadavg()]}
        report["ok"] = all(p["status"] in ("ok", "skipped") for p in report["parts"])
        write_json(options.out / JSON_NAME, report)
        write_text(options.out / MARKDOWN_NAME, markdown(report))
    return report


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------

def _number(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _mfu(value: Optional[float]) -> str:
    return "MFU n/a (no peak FLOP/s for this device)" if value is None else f"MFU {value:.1%}"


def summary(record: dict) -> str:
    """The headline numbers of one part, for the table."""
    result = record.get("result")
    if record["status"] not in ("ok", "failed") or not result:
        return "—"
    name = record["part"]
    if name == "cuda_tests":
        return f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if name == "tokenizer_training":
        return (f"{result['config']} batch {result['batch']}: {_number(result['train_images_per_second'])} images/s, "
                f"{_mfu(result['mfu'])}, {result['precision']}")
    if name == "generator_training":
        return (f"{result['config']} ({result['num_tokens']} tokens) batch {result['batch']}: "
                f"{_number(result['tokens_per_second'], 0)} tokens/s, {_mfu(result['mfu'])}, {result['precision']}")
    if name == "generator_sampling":
        return (f"{result['config']} ({result['num_tokens']} tokens, CFG {result['cfg_scale']}) batch "
                f"{result['batch']}: {_number(result['images_per_second_kv_cache'])} images/s with the KV cache, "
                f"{_number(result['images_per_second_no_cache'])} without ({result['kv_cache_speedup']}x)")
    if name == "compiled_sampling":
        return (f"{result['config']} batch {result['batch']}, {result['mode']}: "
                f"{_number(result['images_per_second_compiled'])} images/s against "
                f"{_number(result['images_per_second_kv_cache'])} eager ({result['compiled_over_kv_cache']}x; "
                f"{result['compiled_over_floor']} of the floor), {_number(result['compile_seconds'])} s tracing; "
                f"{result['unique_graphs']} graphs, {result['graph_breaks']} graph breaks, "
                f"{result['cudagraph_skips']} CUDA-graph skips")
    if name == "ddp":
        return (f"{result['backend']}, world size {result['world_size']}, {result['config']} batch {result['batch']}: "
                f"gradients match the step without DDP (max difference {result['max_gradient_difference']:.2g})")
    if name == "pipeline" and "total_seconds" in result:
        return f"{len(result['stages'])} stages on {result['device']} in {result['total_seconds']:.0f} s"
    return "—"


def _package_line(packages: dict[str, dict[str, Optional[str]]]) -> str:
    """``name version`` for each, the pin beside a version that differs; MLflow's absence explained."""
    words = []
    for name, found in packages.items():
        installed, pinned = found["installed"], found["pinned"]
        if installed is None:
            words.append(f"{name} missing" + (" (stages run untracked)" if name in OPTIONAL.values() else ""))
        else:
            differs = pinned is not None and installed.split("+")[0] != pinned
            words.append(f"{name} {installed}" + (f" (pinned {pinned})" if differs else ""))
    return ", ".join(words) or "—"


def _timing(timing: dict[str, float]) -> str:
    """``images_per_second 242.9, mfu 41.0%, resumed_from_step 0``, or a dash."""
    def shown(key: str, value: float) -> str:
        return f"{value:.1%}" if key == "mfu" else _number(value, 0 if isinstance(value, int) else 1)

    return ", ".join(f"{key} {shown(key, value)}" for key, value in timing.items()) or "—"


def markdown(report: dict) -> str:
    meta = report["meta"]
    titles = {part.name: part.title for part in PARTS}
    lines = ["# Device check (`python -m spectralar.gpu_check`)", ""]
    if meta["mode"] == "quick":
        lines += ["**Quick mode: tiny sizes that test the plumbing; no number here is a benchmark.**", ""]
    lines += [f"- started {meta['started']}, {meta['mode']} mode, {meta.get('elapsed_s', 0):.0f} s of a "
              f"{meta['budget_s']:.0f} s budget",
              f"- device: {meta['device']}" + (f" ({meta['gpu']})" if meta["gpu"] else "")
              + f"; torch {meta['torch']}, CUDA {meta['cuda']}, Python {meta['python']}",
              f"- host: {meta['host_cpus']} CPUs, load average {meta['load_average_start']} at the start, "
              f"{meta.get('load_average_end')} at the end (timings on a loaded host are 'under load')",
              f"- packages: {_package_line(meta.get('packages', {}))}",
              "", "| part | status | result | seconds | note |", "|---|---|---|---|---|"]
    for record in report["parts"]:
        note = record["note"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {titles[record['part']]} | {record['status']} | {summary(record)} | "
                     f"{record['seconds']:.1f} | {note} |")
    stages = next((r["result"]["stages"] for r in report["parts"]
                   if r["part"] == "pipeline" and r.get("result", {}).get("stages")), None)
    if stages:
        lines += ["", "Pipeline stages (wall seconds, process start included; the rates and timings each stage "
                      "recorded in its timing file):", "",
                  "| stage | seconds | exit | timing file |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['seconds']:.1f} | {'killed' if s['returncode'] is None else s['returncode']} | "
                  f"{_timing(s['timing'])} |" for s in stages]
    lines += ["", f"Logs of every part: `logs/` beside this file; all numbers: `{JSON_NAME}`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _limit(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PART_NAMES or not seconds:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART in {', '.join(PART_NAMES)}, got {text!r}")
    return name, float(seconds)


def _parts(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(PART_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; known: {', '.join(PART_NAMES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spectralar.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, gpu_check.md and logs/")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU): tests the plumbing")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--parts", type=_parts, default=PART_NAMES, help=f"comma list of {', '.join(PART_NAMES)}")
    parser.add_argument("--limit", type=_limit, action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's time limit (repeatable)")
    parser.add_argument("--pipeline-params", type=Path, help="params file for the pipeline copy (default: params.yaml; "
                        "its run.device is set to the device checked)")
    parser.add_argument("--pipeline-until", metavar="STAGE", help="run the pipeline only up to this stage "
                        "(with the stages it depends on)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the pipeline's temporary copy")
    parser.add_argument("--part", choices=tuple(BENCHMARKS), help=argparse.SUPPRESS)  # a child process's part
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.part:  # a child: one benchmark, its result as JSON
        write_json(args.result, BENCHMARKS[args.part](sizes, args.device))
        return 0
    pipeline_params = args.pipeline_params.resolve() if args.pipeline_params else None
    options = Options(out=args.out.resolve(), quick=args.quick, device=args.device, budget_s=args.budget,
                      parts=args.parts, limits=dict(args.limit), pipeline_params=pipeline_params,
                      pipeline_until=args.pipeline_until, keep_workdir=args.keep_workdir)
    report = run_check(options)
    log.info("results in %s and %s", options.out / JSON_NAME, options.out / MARKDOWN_NAME)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
