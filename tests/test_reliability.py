"""Regression tests for the defects a fault probe found in resume, checkpoints, output folders,
temporaries and concurrent writers (one test per defect; tests/test_faults.py has the bad-input ones)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from spectralar.io import atomic_path, replace_directory, temporary_siblings
from spectralar.stages.common import Checkpointer
from spectralar.training import save_checkpoint
from tests.conftest import REPO
from tests.test_tokenizer_stages import Project


@pytest.fixture
def project(tmp_path, fashion_dir):
    torch.set_num_threads(1)
    return Project(tmp_path, fashion_dir)


@pytest.fixture
def warnings_seen(caplog):
    """The project's log records (the CLI's setup_logging stops propagation to the root logger)."""
    logger = logging.getLogger("spectralar")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


class Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(1))


def _checkpointer_with_steps(tmp_path, steps=(2, 4)) -> Checkpointer:
    checkpointer = Checkpointer(tmp_path / "ck", "digest", keep=5)
    for step in steps:
        model = Counter()
        model.value.data.fill_(step)
        checkpointer.save(step, {"model": model})
    return checkpointer


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage"])
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, warnings_seen, damage):
    checkpointer = _checkpointer_with_steps(tmp_path)
    latest = tmp_path / "ck" / "step_00000004.pt"
    data = latest.read_bytes()
    latest.write_bytes({"truncate": data[: len(data) // 2], "zero": bytes(len(data)), "garbage": b"not a zip"}[damage])
    model = Counter()
    assert checkpointer.peek_step() == 2
    assert checkpointer.resume({"model": model}) == 2
    assert float(model.value.detach()) == 2.0
    assert "step_00000004.pt: unreadable" in warnings_seen.text


def test_no_readable_checkpoint_starts_fresh_with_a_warning(tmp_path, warnings_seen):
    checkpointer = _checkpointer_with_steps(tmp_path)
    for path in (tmp_path / "ck").glob("step_*.pt"):
        path.write_bytes(b"")
    assert checkpointer.resume({"model": Counter()}) == 0
    assert "no readable checkpoint" in warnings_seen.text


def test_model_files_and_checkpoints_are_world_readable_like_every_output(tmp_path):
    save_checkpoint(tmp_path / "model.pt", {"weights": torch.zeros(2)})
    with atomic_path(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{}")
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_output_folder_is_swapped_in_with_renames_only(tmp_path, monkeypatch):
    """A kill while the old folder is being deleted leaves the new complete folder at the path (the old
    one sits aside under a temporary name that the next run removes), never a half-deleted folder."""
    out = tmp_path / "models"
    with atomic_path(out, directory=True) as tmp:
        (tmp / "a.pt").write_text("old")
        (tmp / "config.json").write_text("old")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while deleting the old folder")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out, directory=True) as tmp:
            (tmp / "a.pt").write_text("new")
            (tmp / "config.json").write_text("new")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.pt": "new", "config.json": "new"}
    assert [p.name.startswith(".models.old.") for p in temporary_siblings(out)] == [True]


def test_a_killed_replace_never_leaves_a_mixed_folder(tmp_path, monkeypatch):
    """Between the two renames the path is absent (the old folder aside), never a mix of old and new."""
    old, new = tmp_path / "out", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "file").write_text(text)
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(new, old)
    assert not old.exists() and (new / "file").read_text() == "new"
    assert [(p / "file").read_text() for p in temporary_siblings(old)] == ["old"]


def test_tokenizer_output_folder_is_all_or_nothing(project, monkeypatch):
    """A kill after tokenizer.pt is written but before the rest leaves the old complete folder."""
    project.run_all()
    before = {p.name: p.read_bytes() for p in (project.root / "tokenizer").iterdir()}
    import spectralar.stages.train_tokenizer as stage

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed after tokenizer.pt")

    monkeypatch.setattr(stage, "write_history", dies)
    with pytest.raises(KeyboardInterrupt):
        project.run("train_tokenizer")
    assert {p.name: p.read_bytes() for p in (project.root / "tokenizer").iterdir()} == before
    assert not temporary_siblings(project.root / "tokenizer")  # the aborted attempt cleaned up after itself


def test_stale_temporaries_of_a_killed_run_are_removed_by_the_next_run(project):
    project.run("prepare")
    stale_folder = project.root / ".prepared.killed.tmp"
    stale_folder.mkdir()
    (stale_folder / "shard.npy").write_bytes(b"x" * 1000)
    stale_file = project.root / ".prepare.json.killed.tmp"
    stale_file.write_text("{")
    other = project.root / ".other.keep.tmp"  # another output's temporary: not ours to delete
    other.write_text("")
    result = _cli(project.argv("prepare"))
    assert result.returncode == 0, result.stderr
    assert not stale_folder.exists() and not stale_file.exists() and other.exists()
    assert result.stderr.count("left behind by a killed run") == 2


def test_finished_proxy_code_table_survives_a_kill_before_it_is_moved_into_place(project, monkeypatch):
    project.run_all(until="extract_proxy_codes")
    reference = np.load(project.root / "codes" / "train.npy")
    shutil.rmtree(project.root / "codes")
    import spectralar.stages.extract_proxy_codes as stage

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(stage, "replace_directory", killed)
    with pytest.raises(KeyboardInterrupt):
        project.run("extract_proxy_codes")
    monkeypatch.undo()
    metrics = project.run("extract_proxy_codes")
    assert metrics["resumed_from_row"] == len(reference)  # moved, not recomputed
    assert np.array_equal(np.load(project.root / "codes" / "train.npy"), reference)


def _cli(argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPECTRALAR_TRACKING="0")
    env.pop("SPECTRALAR_STAGE_LOCK_HELD", None)
    return subprocess.run([sys.executable, "-m", "spectralar", *map(str, argv)], env=env, capture_output=True, text=True)


def test_a_second_writer_of_the_same_stage_is_refused(project):
    """DVC and Snakemake share no lock: the CLI takes one per stage output, whichever tool runs it."""
    from spectralar.stages.context import stage_lock

    project.run("prepare")
    argv = [str(a) for a in project.argv("prepare")]
    with stage_lock("prepare", argv[argv.index("--metrics") + 1]):
        result = _cli(argv)
        assert result.returncode == 2, result.stderr
        assert f"is already running in process {os.getpid()}" in result.stderr, result.stderr
    assert _cli(argv).returncode == 0  # released: the same command now runs


def test_lock_files_are_ignored_by_git_and_dvc():
    assert "/.spectralar/" in (REPO / ".gitignore").read_text()
    assert ".spectralar/" in (REPO / ".dvcignore").read_text()


def test_a_truncated_model_file_stops_the_next_stage_with_its_name(project, capfd):
    from spectralar.cli import main

    project.run_all()
    model = project.root / "tokenizer" / "tokenizer.pt"
    model.write_bytes(model.read_bytes()[:1000])
    argv = ["dump_tokens", "--params", project.params, "--metrics", project.root / "dump_tokens.json",
            "--data", project.root / "prepared", "--tokenizer", model, "--out", project.root / "tokens"]
    capfd.readouterr()  # only what the failing command prints
    assert main([str(a) for a in argv]) == 2
    err = capfd.readouterr().err
    assert f"{model}: unreadable" in err and "Traceback" not in err
    assert not (project.root / "tokens").exists()


def test_a_full_disk_is_one_clear_line_and_leaves_the_earlier_output(project, monkeypatch, capfd):
    import errno

    from spectralar.cli import main

    project.run("prepare")
    before = sorted(p.name for p in (project.root / "prepared").rglob("*"))
    real_save = np.save

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    capfd.readouterr()  # only what the failing command prints
    assert main([str(a) for a in project.argv("prepare")]) == 2
    monkeypatch.setattr(np, "save", real_save)
    err = capfd.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in (project.root / "prepared").rglob("*")) == before  # the old output intact
    assert not temporary_siblings(project.root / "prepared")  # and no temporary left


def test_a_damaged_proxy_code_table_stops_train_tokenizer_with_its_name(tmp_path, fashion_dir, capfd, monkeypatch):
    """extract_proxy_codes records the table's shape, dtype, size and sha256; train_tokenizer checks them."""
    from spectralar.cli import main
    from spectralar.io import read_json, sha256_file

    torch.set_num_threads(1)
    monkeypatch.setenv("SPECTRALAR_VERIFY", "full")  # (the default, auto, hashes a table this small too)
    project = Project(tmp_path, fashion_dir, {"tokenizer.decoder_head": "proxy_codes"})  # stage 1 reads the table
    project.run_all(until="extract_proxy_codes")
    table = project.root / "codes" / "train.npy"
    record = read_json(project.root / "codes" / "manifest.json")["files"]["train.npy"]
    assert record == {"shape": [60, 8, 64], "dtype": "uint16", "bytes": table.stat().st_size,
                      "sha256": sha256_file(table)}
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    capfd.readouterr()  # only what the failing command prints
    assert main([str(a) for a in project.argv("train_tokenizer")]) == 2
    err = capfd.readouterr().err
    assert f"{table}: content does not match the sha256 in {project.root / 'codes' / 'manifest.json'}" in err
    assert f"rerun extract_proxy_codes: `dvc repro -f -s extract_proxy_codes` or `snakemake -f {project.root / 'codes'}`" in err
    assert "Traceback" not in err and not (project.root / "tokenizer").exists()


def test_a_damaged_token_dump_is_named_when_the_generator_reads_it(project, monkeypatch):
    """dump_tokens records each file's shape, dtype, size and sha256; load_tokens checks them."""
    from spectralar.artifacts import load_tokens
    from spectralar.cli import main
    from spectralar.io import ArtifactError

    monkeypatch.setenv("SPECTRALAR_VERIFY", "full")
    project.run_all()
    tokens = project.root / "tokens"
    argv = ["dump_tokens", "--params", project.params, "--metrics", project.root / "dump_tokens.json",
            "--data", project.root / "prepared", "--tokenizer", project.root / "tokenizer" / "tokenizer.pt",
            "--out", tokens]
    assert main([str(a) for a in argv]) == 0
    manifest, ids, labels = load_tokens(tokens, "val")
    assert manifest["files"]["val.npy"]["shape"] == [20, 8] and ids.shape == (20, 8) and len(labels) == 20
    assert set(manifest["files"]) == {"train.npy", "labels.npy", "val.npy", "val_labels.npy"}
    data = bytearray((tokens / "train.npy").read_bytes())
    data[-1] ^= 1
    (tokens / "train.npy").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as error:
        load_tokens(tokens, "train")
    assert str(error.value).startswith(f"{tokens / 'train.npy'}: content does not match the sha256")
    assert "rerun dump_tokens" in str(error.value)
