"""What a user expects of the MLflow record: trained models that load back and decode the same images,
unique run names, the pipeline's params, MLflow's user/source/commit tags, constants as params, one
name per loss, and a copied project that writes its artifacts into the copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import write_params


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _track(monkeypatch, uri: str) -> None:
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("SPECTRALAR_PARENT_RUN_ID", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)


def _tiny_codec():
    from spectralar.models.codec import SpectralCodec
    from spectralar.models.proxy_vq import ProxyConfig, ProxyVQModel
    from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig

    torch.manual_seed(0)
    tokenizer = NestedSpectralTokenizer(TokenizerConfig(
        image_size=8, in_channels=1, patch_size=2, width=32, encoder_depth=1, decoder_depth=1, heads=2, mlp_ratio=2.0,
        num_tokens=5, codebook_size=32, code_dim=8, proxy_codebook_size=16))
    proxy = ProxyVQModel(ProxyConfig(image_size=8, channel_multipliers=(1, 2), res_blocks=1, base_channels=8,
                                     codebook_size=16))
    return SpectralCodec(tokenizer, proxy, (1, 2, 3, 4, 8), soft=True).eval()


def test_a_logged_tokenizer_and_generator_load_back_and_decode_the_same_images(tmp_path, empty_store, monkeypatch):
    import mlflow.pytorch
    from spectralar.config import TrackingConfig
    from spectralar.models.generator import GeneratorConfig, SpectralGPT
    from spectralar.tracking import StageRun

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _track(monkeypatch, uri)
    codec = _tiny_codec()
    generator = SpectralGPT(GeneratorConfig(num_tokens=5, vocab_size=32, num_classes=10, depth=1, width=32,
                                            heads=2)).eval()
    images = torch.rand(3, 1, 8, 8) * 2 - 1  # (B, C, H, W)
    ids_BN = codec.encode(images)
    labels_B = torch.tensor([0, 3, 9])
    with StageRun(TrackingConfig(), "train_tokenizer", params={}, params_hash="0" * 16) as run:
        tokenizer_uri = run.log_model("tokenizer", codec, ids_BN, codec.decode(ids_BN))
        with torch.no_grad():
            generator_uri = run.log_model("generator", generator, {"ids": ids_BN, "labels": labels_B},
                                          generator(ids_BN, labels_B))
    assert tokenizer_uri and generator_uri
    loaded_codec = mlflow.pytorch.load_model(tokenizer_uri)
    assert torch.equal(loaded_codec.decode(ids_BN), codec.decode(ids_BN))
    assert torch.equal(loaded_codec.decode(ids_BN[:, :3]), codec.decode(ids_BN[:, :3]))  # prefixes too
    assert torch.equal(loaded_codec.encode(images), ids_BN)
    loaded_generator = mlflow.pytorch.load_model(generator_uri).eval()
    with torch.no_grad():
        assert torch.equal(loaded_generator(ids_BN, labels_B), generator(ids_BN, labels_B))
    from mlflow.models import get_model_info

    def specs(uri: str) -> dict:
        signature = get_model_info(uri).signature
        return {side: {spec.get("name"): (spec["tensor-spec"]["dtype"], tuple(spec["tensor-spec"]["shape"]))
                       for spec in schema.to_dict()}
                for side, schema in (("inputs", signature.inputs), ("outputs", signature.outputs))}

    assert specs(tokenizer_uri) == {"inputs": {None: ("int64", (-1, 5))}, "outputs": {None: ("float32", (-1, 1, 8, 8))}}
    assert specs(generator_uri) == {"inputs": {"ids": ("int64", (-1, 5)), "labels": ("int64", (-1,))},
                                    "outputs": {None: ("float32", (-1, 5, 32))}}
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_run(run.run_id).info.status == "FINISHED"  # ended by the stage run




def test_runs_have_unique_names_standard_tags_constants_as_params_and_one_loss_key(tmp_path, empty_store,
                                                                                      monkeypatch):
    import getpass
    import subprocess

    from mlflow.tracking import MlflowClient
    from spectralar.config import load_params
    from spectralar.tracking import StageRun

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _track(monkeypatch, uri)
    params = load_params(write_params(tmp_path / "params.yaml"))
    sections = ("run", "generator", "train_generator")
    runs = []
    for _ in range(2):  # a rerun with the same params
        with StageRun(params.tracking, "train_generator", params=params.subset(sections),
                      params_hash=params.digest(sections), params_file=params.path) as run:
            for step in (1, 2):
                run.log_metrics({"train_loss": 1.0 / step}, step=step)  # the training curve
            run.log_results({"train_loss": 0.5, "val_loss": 0.4, "steps": 2, "world_size": 1, "peak_lr": 0.002,
                             "psnr_prefix": [10.0, 12.5], "decode": "soft", "stage_seconds": 3.5})
        runs.append(run)
    client = MlflowClient(tracking_uri=uri)
    digest = params.digest(sections)[:6]
    assert [client.get_run(r.run_id).info.run_name for r in runs] == [f"train_generator #1 {digest}",
                                                                      f"train_generator #2 {digest}"]
    first = client.get_run(runs[0].run_id)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for run in (first, client.get_run(runs[0].pipeline_run_id)):
        assert run.data.tags["mlflow.user"] == getpass.getuser()
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"]
        assert run.data.tags["mlflow.source.git.commit"] == commit
    # one key per quantity: train_loss is the curve, whose last point is the result
    assert [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, "train_loss")] == [(1, 1.0), (2, 0.5)]
    assert first.data.metrics == {"train_loss": 0.5, "val_loss": 0.4, "psnr_prefix": 12.5, "stage_seconds": 3.5}
    assert [(m.step, m.value) for m in client.get_metric_history(first.info.run_id, "psnr_prefix")] == [(1, 10.0), (2, 12.5)]
    # constants and text are params, beside the sections the stage read
    assert {k: first.data.params[k] for k in ("steps", "world_size", "peak_lr", "decode")} == {
        "steps": "2", "world_size": "1", "peak_lr": "0.002", "decode": "soft"}
    assert first.data.params["train_generator.steps"] == str(params.train_generator.steps)
    # the pipeline run: every resolved param, a numbered name, and both stage runs under it
    pipeline = client.get_run(runs[0].pipeline_run_id)
    assert runs[1].pipeline_run_id == pipeline.info.run_id
    assert pipeline.info.run_name.startswith("pipeline ") and " #1 " in pipeline.info.run_name
    assert pipeline.data.params["tracking.experiment"] == "spectralar"
    assert pipeline.data.params["data.resolution"] == str(params.data.resolution)
    assert pipeline.data.params["train_generator.steps"] == str(params.train_generator.steps)
    assert set(pipeline.data.params) > {f"{s}.{k}" for s in ("run", "data") for k in params.subset((s,))[s]}
    experiment = client.get_experiment(first.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table


def test_a_copied_project_writes_its_artifacts_into_the_copy(tmp_path, empty_store, monkeypatch):
    from mlflow.tracking import MlflowClient
    from spectralar.config import TrackingConfig
    from spectralar.tracking import StageRun

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    shutil.copy(empty_store, original / "mlflow.db")
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    for name in ("MLFLOW_TRACKING_URI", "SPECTRALAR_PARENT_RUN_ID", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    cfg = TrackingConfig()  # sqlite:///mlflow.db, relative to the project root

    def stage_writes(text: str) -> StageRun:
        Path("out.txt").write_text(text)
        with StageRun(cfg, "prepare", params={}, params_hash="0" * 16) as run:
            run.log_artifact("out.txt")
        return run

    monkeypatch.chdir(original)
    first = stage_writes("original\n")
    shutil.copytree(original, copy)
    monkeypatch.chdir(copy)
    second = stage_writes("copy\n")
    assert (copy / "mlartifacts" / second.run_id / "artifacts/out.txt").read_text() == "copy\n"
    assert not (original / "mlartifacts" / second.run_id).exists()
    original_client = MlflowClient(tracking_uri=f"sqlite:///{original / 'mlflow.db'}")
    assert original_client.get_experiment_by_name("spectralar").artifact_location == (original / "mlartifacts").as_uri()
    shutil.rmtree(original)  # the copy stands alone: its record shows its own files, older runs included
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    for run, text in ((first, "original\n"), (second, "copy\n")):
        assert client.get_run(run.run_id).info.artifact_uri == (copy / "mlartifacts" / run.run_id / "artifacts").as_uri()
        assert Path(client.download_artifacts(run.run_id, "out.txt", str(tmp_path))).read_text() == text
