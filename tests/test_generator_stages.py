"""dump_tokens -> train_generator -> sample on a tiny config: outputs, DDP parity, resume, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spectralar.config import ConfigError
from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from spectralar.models.generator import GeneratorConfig
from spectralar.models.sampling import generate
from spectralar.artifacts import load_codec, load_model_file
from tests.conftest import REPO, TINY, make_fashion_dir, write_params
from tests.test_tokenizer_stages import Project

N_TOKENS, VOCAB = TINY["tokenizer.num_tokens"], TINY["tokenizer.codebook_size"]


class GeneratorProject(Project):
    """The tokenizer Project plus the three generator stages, all under one temporary root."""

    def argv(self, stage: str) -> list[str]:
        r = self.root
        paths = {
            "dump_tokens": ["--data", r / "prepared", "--tokenizer", r / "tokenizer/tokenizer.pt", "--out", r / "tokens"],
            "train_generator": ["--tokens", r / "tokens", "--out", r / "generator", "--checkpoints", r / "ck_gen"],
            "sample": ["--generator", r / "generator/generator.pt", "--tokenizer", r / "tokenizer/tokenizer.pt",
                       "--data", r / "prepared", "--out", r / "samples"],
        }.get(stage)
        if paths is None:
            return super().argv(stage)
        return [stage, "--params", str(self.params), "--metrics", str(r / f"{stage}.json"), *map(str, paths)]

    def set_params(self, overrides: dict) -> None:
        fashion = self.root.parent / "fashion"
        self.params = write_params(self.root / "params.yaml",
                                   {"data.fashion_mnist_dir": str(fashion), **TINY, **overrides})


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """prepare -> train_proxy -> extract_proxy_codes -> train_tokenizer -> dump_tokens, once per module."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("generator_stages")
    fashion = make_fashion_dir(base / "fashion")
    (base / "template").mkdir()
    project = GeneratorProject(base / "template", fashion)
    project.run_all()
    project.run("dump_tokens")
    return project.root


@pytest.fixture
def project(tokenized, tmp_path) -> GeneratorProject:
    """A private copy of the tokenized project (each test writes its own generator and samples)."""
    torch.set_num_threads(1)
    root = tmp_path / "p"
    (tmp_path / "fashion").symlink_to(tokenized.parent / "fashion")
    root.mkdir()
    for name in ("prepared", "tokenizer", "tokens"):
        shutil.copytree(tokenized / name, root / name)
    project = GeneratorProject.__new__(GeneratorProject)
    project.root = root
    project.set_params({})
    return project


def _history(path: Path) -> list[dict]:
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------------------ dump_tokens

def test_dump_tokens_are_the_codec_ids_of_the_train_split(project, tmp_path):
    root = project.root
    manifest = json.loads((root / "tokens" / "manifest.json").read_text())
    assert manifest["num_tokens"] == N_TOKENS and manifest["vocab"] == VOCAB and manifest["num_classes"] == 10
    assert manifest["omegas"] == [1, 2, 3, 4, 6, 8, 20, 32] and len(manifest["tokenizer_sha256"]) == 64
    ids, labels = np.load(root / "tokens" / "train.npy"), np.load(root / "tokens" / "labels.npy")
    assert ids.shape == (60, N_TOKENS) and ids.dtype == np.uint16 and labels.dtype == np.int64
    shards = ImageShards(root / "prepared", "train")
    assert np.array_equal(labels, shards.labels)
    # independent path: the codec on images taken one at a time (other batching than the stage's)
    codec = load_codec(root / "tokenizer" / "tokenizer.pt", "cpu")
    for index in (0, 17, 59):
        image = torch.from_numpy(shards.images([index])).permute(0, 3, 1, 2)
        assert np.array_equal(codec.encode(to_float(image))[0].numpy(), ids[index].astype(np.int64))
    assert np.load(root / "tokens" / "val.npy").shape == (20, N_TOKENS)
    # deterministic: a rerun with another batch size writes identical tables
    project.set_params({"dump_tokens.batch_size": 7})
    argv = project.argv("dump_tokens")
    argv[argv.index(str(root / "tokens"))] = str(tmp_path / "tokens2")
    from spectralar.cli import build_parser, run_stage

    run_stage("dump_tokens", build_parser().parse_args(argv))
    for name in ("train.npy", "labels.npy", "val.npy", "manifest.json"):
        assert (tmp_path / "tokens2" / name).read_bytes() == (root / "tokens" / name).read_bytes(), name
    timing = json.loads((root / "dump_tokens.timing.json").read_text())  # the tokenizing rate: telemetry
    assert timing["images_per_second"] > 0
    assert "images_per_second" not in json.loads((root / "dump_tokens.json").read_text())


def test_load_codec_needs_a_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage"):
        load_codec(tmp_path / "absent.pt", "cpu")


# ------------------------------------------------------------------------------------------ train_generator

def test_train_generator_outputs_and_checkpoint_round_trip(project):
    from spectralar.artifacts import load_generator

    metrics = project.run("train_generator")
    root = project.root
    for name in ("generator.pt", "history.csv", "config.json"):
        assert (root / "generator" / name).is_file(), name
    assert metrics["steps"] == 6 and metrics["world_size"] == 1 and metrics["peak_lr"] == pytest.approx(4e-3 * 8 / 256)
    assert 0 < metrics["train_loss"] < 10 and 0 <= metrics["val_accuracy"] <= 1 and metrics["val_images"] == 10
    assert metrics["tokens_per_second"] > 0 and metrics["mfu"] is None  # no peak FLOP/s on CPU
    history = _history(root / "generator" / "history.csv")
    # a row every log_every (2) steps and at every checkpoint_every (3) step, where the validation
    # curve (EMA weights, held out) is measured; its last point is the stage's reported val metrics
    assert [row["step"] for row in history] == [2, 3, 4, 6]
    assert [row["step"] for row in history if "val_loss" in row] == [3, 6]
    assert history[-1]["val_loss"] == metrics["val_loss"] and history[-1]["val_accuracy"] == metrics["val_accuracy"]
    assert not list((root / "ck_gen").glob("step_*.pt"))  # finished: nothing left to resume
    # round trip: the file rebuilds the same model (config + EMA weights)
    state = load_model_file(root / "generator" / "generator.pt", "generator")
    model, extra = load_generator(root / "generator" / "generator.pt", "cpu")
    assert model.config == GeneratorConfig(**{**state["configs"]["generator"]})
    tokens = json.loads((root / "tokens" / "manifest.json").read_text())  # the shape flows from the tokens
    assert (model.config.num_tokens, model.config.vocab_size, model.config.num_classes) == \
        (tokens["num_tokens"], tokens["vocab"], tokens["num_classes"]) == (N_TOKENS, VOCAB, 10)
    assert all(torch.equal(v, state["weights"]["generator"][k]) for k, v in model.state_dict().items())
    assert extra["class_names"][0] == "T-shirt/top" and not model.training
    ids = torch.from_numpy(np.load(root / "tokens" / "val.npy")[:4].astype(np.int64))
    logits = model(ids, torch.arange(4))
    assert logits.shape == (4, N_TOKENS, VOCAB) and torch.isfinite(logits).all()


def test_generator_shape_comes_from_the_tokens_and_is_not_a_param(project):
    """N, the vocabulary and the classes are declared upstream and read from the token dump; an
    old params file that still restates one is refused, naming the key and where it comes from."""
    for key, value in (("generator.vocab_size", 64), ("generator.num_tokens", 16), ("generator.num_classes", 11)):
        project.set_params({key: value})
        with pytest.raises(ConfigError, match=rf"{key}: no longer a params key: its value comes from the token dump"):
            project.run("train_generator")


def test_generator_worker_reproduces_its_stage(project):
    """train_generator's Trainer takes explicit values: run by hand, it trains the stage's model."""
    from spectralar.artifacts import generator_config_for, load_tokens
    from spectralar.config import load_params
    from spectralar.stages.train_generator import Trainer
    from spectralar.training import init_distributed, seed_everything

    params = load_params(project.params)
    manifest, ids, labels = load_tokens(project.root / "tokens")
    config = generator_config_for(params.generator, manifest)
    seed_everything(params.run.seed)
    trainer = Trainer(config, params.train_generator, ids, labels, init_distributed(device_preference="cpu"),
                      seed=params.run.seed)
    trainer.fit()
    project.run("train_generator")
    saved = load_model_file(project.root / "generator" / "generator.pt", "generator")["weights"]["generator"]
    state = trainer.model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_killed_generator_run_resumes_bit_identically(project, monkeypatch):
    import spectralar.stages.train_generator as stage

    # drop path and dropout on: their draws must repeat after a resume too
    project.set_params({"generator.drop_path_rate": 0.2, "generator.dropout": 0.1, "train_generator.steps": 8,
                        "train_generator.checkpoint_every": 3})
    reference = project.run("train_generator")
    expected = load_model_file(project.root / "generator" / "generator.pt", "generator")["weights"]["generator"]
    expected_history = (project.root / "generator" / "history.csv").read_bytes()
    original = stage.Trainer._log

    def dies_after_step_4(self, step, *args):
        original(self, step, *args)
        if step == 4:  # after the checkpoint of step 3
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stage.Trainer, "_log", dies_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        project.run("train_generator")
    assert [p.name for p in (project.root / "ck_gen").glob("step_*.pt")] == ["step_00000003.pt"]
    monkeypatch.setattr(stage.Trainer, "_log", original)
    resumed = project.run("train_generator")
    assert resumed["resumed_from_step"] == 3
    actual = load_model_file(project.root / "generator" / "generator.pt", "generator")["weights"]["generator"]
    assert all(torch.equal(value, actual[key]) for key, value in expected.items())
    # the whole history file (results only: no wall-clock column)
    assert (project.root / "generator" / "history.csv").read_bytes() == expected_history
    assert resumed["val_loss"] == reference["val_loss"]


def test_two_processes_reproduce_the_single_process_loss_curve(project):
    """torchrun with 2 gloo processes, each half of the same global batch == 1 process (issue text)."""
    overrides = {"generator.drop_path_rate": 0.0, "train_generator.log_every": 1, "run.device": "cpu",
                 "train_generator.checkpoint_every": 100}
    project.set_params(overrides)
    single = project.run("train_generator")
    one = _history(project.root / "generator" / "history.csv")
    argv = project.argv("train_generator")
    for flag, value in (("--out", "generator2"), ("--checkpoints", "ck_gen2"), ("--metrics", "two.json")):
        argv[argv.index(flag) + 1] = str(project.root / value)
    store = f"sqlite:///{project.root / 'mlflow.db'}"
    # the stage's own command line; SPECTRALAR_NPROC_PER_NODE makes the CLI relaunch it under torchrun
    env = dict(os.environ, SPECTRALAR_TRACKING="1", MLFLOW_TRACKING_URI=store, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), SPECTRALAR_NPROC_PER_NODE="2")
    result = subprocess.run([sys.executable, "-m", "spectralar", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mlflow.tracking import MlflowClient  # only rank 0 opens a run and writes the metrics file

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("spectralar").experiment_id],
                              filter_string="tags.`spectralar.stage` = 'train_generator'")
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"  # a setting: a param
    two = _history(project.root / "generator2" / "history.csv")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["accuracy"] - b["accuracy"]) < 1e-6, (a, b)
    metrics = json.loads((project.root / "two.json").read_text())
    assert metrics["world_size"] == 2 and abs(metrics["val_loss"] - single["val_loss"]) < 1e-4


def test_figures_show_a_bounded_number_of_classes():
    from spectralar.stages.sample import grid_classes

    assert grid_classes(10) == list(range(10))
    shown = grid_classes(1000)
    assert len(shown) == 16 and shown[0] == 0 and shown[-1] == 999 and shown == sorted(set(shown))


def test_torchrun_relaunch_only_for_distributed_stages():
    from spectralar.cli import torchrun_command
    from spectralar.config import ConfigError

    argv = ["train_generator", "--params", "p.yaml"]
    command = torchrun_command("train_generator", argv, {"SPECTRALAR_NPROC_PER_NODE": "4"})
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[-4:] == ["spectralar", *argv]
    assert torchrun_command("train_generator", argv, {"SPECTRALAR_NPROC_PER_NODE": "4", "RANK": "0"}) is None
    assert torchrun_command("train_generator", argv, {"SPECTRALAR_NPROC_PER_NODE": "1"}) is None
    assert torchrun_command("train_generator", argv, {}) is None
    assert torchrun_command("sample", ["sample"], {"SPECTRALAR_NPROC_PER_NODE": "4"}) is None  # not data-parallel
    # extract_proxy_codes shards its rows over torchrun's ranks (RANK / WORLD_SIZE), rank 0 assembles
    assert torchrun_command("extract_proxy_codes", ["extract_proxy_codes"], {"SPECTRALAR_NPROC_PER_NODE": "2"})[4] == \
        "--nproc_per_node=2"
    if not torch.cuda.is_available():
        assert torchrun_command("train_generator", argv, {"SPECTRALAR_NPROC_PER_NODE": "auto"}) is None
    with pytest.raises(ConfigError, match="SPECTRALAR_NPROC_PER_NODE must be"):
        torchrun_command("train_generator", argv, {"SPECTRALAR_NPROC_PER_NODE": "many"})


def test_label_dropout_is_drawn_on_the_global_batch(project, monkeypatch):
    """Rank r's labels are rows r·b..(r+1)·b of the single-process batch, dropped labels included."""
    from spectralar.training import DistributedContext

    project.set_params({"generator.class_dropout": 0.5, "train_generator.batch_size": 8})
    trainer = _single_process_trainer(project)
    full_ids, full_labels = trainer.batch(5)
    assert (full_labels == 10).any() and (full_labels != 10).any()  # some dropped to the null class
    for rank in (0, 1):
        trainer.dist = DistributedContext(rank, rank, 2, torch.device("cpu"), rank == 0)
        trainer.local_batch = 4
        ids, labels = trainer.batch(5)
        assert torch.equal(ids, full_ids[4 * rank:4 * rank + 4]) and torch.equal(labels, full_labels[4 * rank:4 * rank + 4])


def test_a_training_step_frees_its_gradients(project):
    """The step updates the weights and leaves no gradient behind: validation copies the model and the
    EMA, and a checkpoint is written, after a step, so a model-sized gradient kept alive until the next
    step's start would sit beside them (at d16 it took the paper-config run to its memory limit)."""
    from spectralar.training import build_adamw

    trainer = _single_process_trainer(project)
    optimizer = build_adamw(trainer.model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for step in range(2):  # the second step runs with the first step's gradients already freed
        terms = trainer._train_step(step, optimizer)
        assert torch.isfinite(terms["loss"]) and float(terms["grad_norm"]) > 0
        assert all(p.grad is None for p in trainer.model.parameters())
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


def _single_process_trainer(project):
    """train_generator's Trainer on the project's tokens and params, as one CPU process."""
    from spectralar.artifacts import generator_config_for, load_tokens
    from spectralar.config import load_params
    from spectralar.stages.train_generator import Trainer
    from spectralar.training import DistributedContext

    params = load_params(project.params)
    manifest, ids, labels = load_tokens(project.root / "tokens")
    single = DistributedContext(0, 0, 1, torch.device("cpu"), True)
    return Trainer(generator_config_for(params.generator, manifest), params.train_generator, ids, labels, single,
                   seed=params.run.seed)


# ------------------------------------------------------------------------------------------ sample

def test_sample_outputs_are_seeded_cyclic_and_truncated(project):
    from PIL import Image

    from spectralar.artifacts import load_generator

    project.run("train_generator")
    metrics = project.run("sample")
    out = project.root / "samples"
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (20, 32, 32, 1) and samples["arr_0"].dtype == np.uint8
    assert samples["labels"].tolist() == list(range(10)) * 2  # cyclic, not sorted
    assert metrics["num_samples"] == 20 and metrics["images_per_second"] > 0
    # Table 3: the drop-2 file decodes the first N-2 tokens, which a run of N-2 tokens would draw too
    # Decoded here in the stage's own batch shape: float results are bit-identical only for the same
    # shapes (a different batch size may change a pixel by one uint8 level on another machine or thread count).
    from spectralar.models.codec import decode_uint8

    codec = load_codec(project.root / "tokenizer" / "tokenizer.pt", "cpu")
    ids = torch.from_numpy(samples["ids"].astype(np.int64))
    dropped = np.load(out / "truncated" / "samples_drop2.npz")
    batch_size = project_sample_config(project).batch_size
    assert np.array_equal(dropped["arr_0"], decode_uint8(codec, ids[:, :N_TOKENS - 2], batch_size))
    assert np.array_equal(samples["arr_0"], decode_uint8(codec, ids, batch_size))
    assert not (out / "truncated" / "samples_drop0.npz").exists()
    model, _ = load_generator(project.root / "generator" / "generator.pt", "cpu")
    cfg = project_sample_config(project)
    short = generate(model, torch.arange(8) % 10, num_tokens=N_TOKENS - 2, cfg_scale=cfg.cfg_scale,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(short, ids[:8, :N_TOKENS - 2])  # first batch of the stage, same seed
    for name in ("grid.png", "grid_0_t-shirt-top.png", "grid_9_ankle-boot.png", "progression.png",
                 "completion.png", "superres.png", "config.json"):
        assert (out / name).is_file(), name
    for method in ("upsample", "stride", "patch"):  # §4.4: 2x super-resolution of the first 2 samples
        superres = np.load(out / f"superres_{method}.npz")
        assert superres["arr_0"].shape == (2, 64, 64, 1) and superres["labels"].tolist() == [0, 1]
    from spectralar.stages.sample import first_visible_prefix

    progression_ids = ids[:project_sample_config(project).progression_samples]
    frames = [decode_uint8(codec, progression_ids[:, :i], len(progression_ids)) for i in range(1, N_TOKENS + 1)]
    shown = N_TOKENS - first_visible_prefix(frames)  # prefixes from the first visible change to N
    with Image.open(out / "progression.gif") as gif:  # Pillow merges identical frames, adding their durations
        durations = []
        for frame in range(gif.n_frames):
            gif.seek(frame)
            durations.append(gif.info["duration"])
        # 300 ms per prefix, the finished image held; a strip of the 2 samples at 4x under a token counter
        assert sum(durations) == 300 * (shown - 1) + 1500
        assert gif.size[0] >= 4 * (2 + 2 * 34) and gif.size[1] > 4 * (2 + 34)
    # seeded: a rerun writes the same samples
    first = (out / "samples.npz").read_bytes()
    project.run("sample")
    assert (out / "samples.npz").read_bytes() == first


def project_sample_config(project):
    from spectralar.config import load_params

    return load_params(project.params).sample


def test_spectrum_completion_keeps_the_given_prefix(project):
    from spectralar.stages.sample import complete_spectrum, completion_inputs
    from spectralar.artifacts import load_generator

    project.run("train_generator")
    model, _ = load_generator(project.root / "generator" / "generator.pt", "cpu")
    codec = load_codec(project.root / "tokenizer" / "tokenizer.pt", "cpu")
    images, labels = completion_inputs(ImageShards(project.root / "prepared", "val"), 10)
    assert labels.tolist() == list(range(10))
    x = to_float(images)
    out = complete_spectrum(model, codec, x, labels, project_sample_config(project), torch.Generator().manual_seed(1))
    k = TINY["sample.completion_prefix"]
    assert torch.equal(out["ids"][:, :k], codec.encode(x)[:, :k]) and out["ids"].shape == (10, N_TOKENS)
    assert out["completion"].shape == out["original"].shape == (10, 1, 32, 32)


@pytest.mark.parametrize("mode", ["stride", "patch"])
def test_subimages_split_and_merge_are_inverse(mode):
    from spectralar.stages.sample import merge_subimages, split_subimages

    x = torch.randn(3, 2, 8, 6, generator=torch.Generator().manual_seed(0))
    subs = split_subimages(x, mode)
    assert subs.shape == (3, 4, 2, 4, 3) and torch.equal(merge_subimages(subs, mode), x)
    if mode == "stride":  # sub-image (a, b) holds pixels (2i+a, 2j+b)
        assert torch.equal(subs[:, 3], x[..., 1::2, 1::2])
        # a nearest-neighbour 2x upsampling splits into 4 copies of the original image
        up = x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        assert all(torch.equal(part, x) for part in split_subimages(up, mode).unbind(1))
    else:  # sub-image (a, b) is quadrant (a, b)
        assert torch.equal(subs[:, 2], x[..., 4:, :3])


def test_sample_rejects_truncation_beyond_the_sequence(project):
    project.run("train_generator")
    project.set_params({"sample.truncate": [0, N_TOKENS]})
    with pytest.raises(ConfigError, match="sample.truncate"):
        project.run("sample")


# ------------------------------------------------------------------------------------------ benchmarks

def test_benchmarks_report_throughput():
    from spectralar.bench import generator_sampling as benchmark_sampling, generator_training as benchmark

    torch.set_num_threads(1)
    config = GeneratorConfig(depth=1, width=32, heads=2, vocab_size=32, num_tokens=8)
    train = benchmark(config, "cpu", batch=8, steps=2, warmup=1, peak=1e12)
    assert train["tokens_per_second"] > 0 and 0 < train["mfu"] < 1
    assert train["flops_per_image"] > 6 * 8 * 32 * 32  # at least the 6·P·N of one 32x32 projection
    sampling = benchmark_sampling(config, "cpu", batch=8, repeats=1)
    assert sampling["images_per_second_kv_cache"] > 0 and sampling["images_per_second_no_cache"] > 0


def test_compile_trains_through_torch_compile(project, monkeypatch):
    """train_generator.compile: true trains through torch.compile (aot_eager standing in for inductor,
    whose C++ compiling takes minutes on CPU); the saved weights carry no wrapper prefix."""
    compiled, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(type(module).__name__)
                        or real(module, backend="aot_eager"))
    project.set_params({"train_generator.compile": True})
    metrics = project.run("train_generator")
    assert compiled == ["TeacherForced"] and metrics["steps"] == 6 and np.isfinite(metrics["train_loss"])
    state = load_model_file(project.root / "generator" / "generator.pt", "generator")
    assert not any("_orig_mod" in name for name in state["weights"]["generator"])


@pytest.mark.parametrize("compile_steps", [False, True])
def test_sample_compile_reaches_the_sampler(monkeypatch, compile_steps: bool) -> None:
    """``sample.compile`` is what every batch of samples asks ``generate`` for (the compiled path itself:
    tests/test_generator.py)."""
    from spectralar.models.generator import SpectralGPT
    from spectralar.stages import sample

    calls = []

    def recording(model, labels, **kwargs):
        calls.append(kwargs)
        return generate(model, labels, **kwargs | {"compiled": False})

    monkeypatch.setattr(sample, "generate", recording)
    model = SpectralGPT(GeneratorConfig(depth=1, width=32, heads=2, vocab_size=8, num_tokens=4, num_classes=3))
    cfg = sample.SampleConfig(num_per_class=3, batch_size=4, compile=compile_steps)
    ids, _ = sample.sample_ids(model, torch.arange(9) % 3, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ids.shape == (9, 4) and len(calls) == 3
    assert all(call["compiled"] is compile_steps for call in calls)
