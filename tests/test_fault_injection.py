"""Fault injection on a tiny pipeline: kills, Ctrl-C, damaged artefacts, read-only and full disks,
concurrent writers and a broken MLflow store. The pipeline (tests/conftest.py's TINY config) is
built once per module with dvc.yaml's own command lines, in dvc.yaml's layout, and each test works
on a copy. tests/test_faults.py (damaged inputs, one loader at a time) and tests/test_reliability.py
(in-process kills at fixed points, one writer refused while the test holds the lock) cover the
single-fault cases; here the faults hit whole stages through the CLI.

| fault | stage | expected outcome |
|---|---|---|
| SIGKILL just before or after the k-th file rename (k seeded), a subprocess through the CLI | train_proxy, extract_proxy_codes, train_tokenizer, train_generator (the resumable stages) | killed; no partial output; the rerun removes the temporaries, resumes from the newest checkpoint and writes outputs and metrics byte-identical to an uninterrupted run |
| SIGINT (Ctrl-C) just before a seeded rename | train_tokenizer | exit non-zero; no output folder, no temporaries; the rerun resumes from the newest checkpoint, byte-identical |
| truncate / zero / flip one byte of each file of each artefact a later stage reads (from dvc.yaml) | every stage that reads it | exit 2; one ERROR line naming the file and "rerun <the stage that makes it>"; no traceback; nothing written. A stage that never opens the damaged file must give the undamaged run's outputs |
| read-only output folder (chmod 555; as root, EROFS raised in process) | train_generator | exit 2, one line; no temporaries; the previous output intact |
| full disk: a small tmpfs (root and a permitted mount only) | train_generator | exit 2, one line; no temporaries; the previous output intact |
| full disk: ENOSPC from fsync, in process | train_generator | exit 2, one line; no temporaries; the previous output intact |
| full disk: ENOSPC from every fsync in the project, in process | every stage | exit 2, one line; no temporaries; the previous outputs intact |
| full disk: a file-size limit (RLIMIT_FSIZE: EFBIG), a subprocess | train_generator | exit 2, one line; no temporaries; the previous output intact |
| the same stage twice at once (two writers of one output) | train_generator | the second is refused at once (exit 2, naming the first's pid); the first finishes with byte-identical outputs |
| two stage processes logging into one sqlite store | train_evalnet + dump_tokens | both exit 0 with the untracked runs' outputs; both MLflow runs FINISHED with their metrics, under one pipeline run |
| an unusable MLflow store (a file that is not a database; a folder at the database path) | train_evalnet | the stage finishes and writes its outputs and metrics; a warning says tracking is off (the folder: refused at once, naming it) |

The outcomes observed are collected in ``OUTCOMES``; at the end of the module the table, with counts,
is written to ``<pytest basetemp>/fault_injection_table.md`` and printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spectralar.cli import main
from spectralar.io import TEMPORARY_SUFFIX
from tests.conftest import REPO, TINY, make_fashion_dir, write_params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
CLI_PREFIX = ["python", "-m", "spectralar"]
OUTPUT_FLAGS = ("--out", "--metrics", "--checkpoints")

# Stages the module builds (everything a later non-report stage reads); correlation and evaluate
# only read, so they run only as readers.
BUILD = ("prepare", "train_proxy", "extract_proxy_codes", "train_tokenizer", "train_evalnet", "reference_stats",
         "dump_tokens", "train_generator", "sample")
RESUMABLE = ("train_proxy", "extract_proxy_codes", "train_tokenizer", "train_generator")  # dump_tokens is not

# Which files of each artefact (a dvc.yaml dep that is another stage's output) are damaged; "" = the dep itself.
DAMAGED_FILES = {
    "data/prepared": ("manifest.json", "train/shard-00000.npy"),
    "models/proxy/proxy.pt": ("",),
    "data/proxy_codes": ("manifest.json", "train.npy"),
    "models/tokenizer/tokenizer.pt": ("",),
    "models/evalnet/evalnet.pt": ("",),
    "data/reference": ("domain.npz",),
    "data/tokens": ("manifest.json", "train.npy", "labels.npy"),
    "models/generator/generator.pt": ("",),
    "samples": ("samples.npz",),
}
NOT_DAMAGED_READERS = {
    "report": "renders the metrics files and copies the figures of finished stages; its JSON inputs go "
              "through read_json (tests/test_faults.py::test_invalid_metrics_json_names_the_file)",
}
DAMAGES = ("truncate", "zero", "flip")

OUTCOMES: list[dict[str, str]] = []


def _record(fault: str, stage: str, outcome: str, kind: str) -> None:
    """kind: clear error | recovered | no effect | silent wrong | data lost | unclear error | skipped."""
    OUTCOMES.append({"fault": fault, "stage": stage, "outcome": outcome, "kind": kind})


# ------------------------------------------------------------------------------------------------
# dvc.yaml: command lines, outputs, and the artefacts each stage reads
# ------------------------------------------------------------------------------------------------

def _path_of(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def stage_argv(stage: str) -> list[str]:
    argv = shlex.split(DVC[stage]["cmd"])
    assert argv[:3] == CLI_PREFIX, DVC[stage]["cmd"]
    return argv[3:]


def _flag(argv: list[str], flag: str):
    return argv[argv.index(flag) + 1] if flag in argv else None


def declared_outputs(stage: str) -> list[str]:
    return [_path_of(entry) for key in ("outs", "metrics") for entry in DVC[stage].get(key, [])]


def artefact_edges() -> list[tuple[str, str, str]]:
    """(dep, the stage that writes it, the stage that reads it) for every dvc.yaml dep that is (inside)
    another stage's output, in dvc.yaml order."""
    producers = {_path_of(entry): name for name, stage in DVC.items()
                 for key in ("outs", "metrics") for entry in stage.get(key, [])}
    edges = []
    for reader, stage in DVC.items():
        for dep in stage.get("deps", []):
            producer = next((name for out, name in producers.items() if dep == out or dep.startswith(out + "/")), None)
            if producer is not None:
                edges.append((dep, producer, reader))
    return edges


EDGES = artefact_edges()
DAMAGE_CASES = [(dep, producer, reader) for dep, producer, reader in EDGES if reader not in NOT_DAMAGED_READERS]


# ------------------------------------------------------------------------------------------------
# The tiny pipeline and its copies
# ------------------------------------------------------------------------------------------------

def temporaries(root: Path) -> list[Path]:
    """What atomic writers leave only when killed: ``.<name>.*.tmp`` files or folders."""
    return sorted(p for p in root.rglob(f".*{TEMPORARY_SUFFIX}") if ".spectralar" not in p.parts)


def tree(path: Path) -> dict[str, bytes]:
    """{relative name: bytes} of a file or of every file under a folder ({} when absent)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.is_dir():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _run_main(root: Path, argv: list[str]) -> tuple[object, str]:
    """``python -m spectralar argv`` in process, in ``root``: (exit code or 'uncaught <error>', stderr)."""
    import io
    import contextlib

    stderr = io.StringIO()
    here = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(stderr):
            try:
                code: object = main(argv)
            except Exception as err:  # what the CLI would print as a traceback
                code = f"uncaught {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        os.chdir(here)
    return code, stderr.getvalue()


class Pipeline:
    """The tiny pipeline in dvc.yaml's layout under ``root`` (relative paths, run from ``root``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.renames: dict[str, int] = {}  # os.replace calls of each stage's uninterrupted run
        self.references: dict[str, dict[str, dict[str, bytes]]] = {}

    def build(self) -> None:
        real_replace = os.replace
        for stage in BUILD:
            count = [0]

            def counting(src, dst, *args, **kwargs):
                count[0] += os.path.abspath(dst).startswith(os.getcwd() + os.sep)  # as FAULT_HOOK counts
                return real_replace(src, dst, *args, **kwargs)

            os.replace = counting
            try:
                code, err = _run_main(self.root, stage_argv(stage))
            finally:
                os.replace = real_replace
            assert code == 0, f"{stage}: {code}\n{err[-3000:]}"
            self.renames[stage] = count[0]
            self.references[stage] = self.outputs(stage, self.root)

    def copy(self, destination: Path) -> Path:
        shutil.copytree(self.root, destination, symlinks=True, ignore=shutil.ignore_patterns(".spectralar"))
        return destination

    def outputs(self, stage: str, root: Path, argv: list[str] | None = None) -> dict[str, dict[str, bytes]]:
        """Every declared output of ``stage`` (out folders and metrics file) as bytes, keyed by the
        dvc.yaml path; ``argv`` maps them to where a redirected run wrote them."""
        declared = stage_argv(stage)
        result = {}
        for path in declared_outputs(stage):
            where = path
            if argv is not None:
                for flag in ("--out", "--metrics"):
                    if _flag(declared, flag) == path:
                        where = _flag(argv, flag)
            result[path] = tree(root / where)
        return result

    def reference(self, stage: str) -> dict[str, dict[str, bytes]]:
        """The undamaged outputs of ``stage``: the build's, or a first run into scratch paths."""
        if stage not in self.references:  # (the build's stages are all in it)
            argv = redirected(stage, "reference")
            code, err = _run_main(self.root, argv)
            assert code == 0, f"{stage}: {code}\n{err[-3000:]}"
            self.references[stage] = self.outputs(stage, self.root, argv)
            _remove_redirected(self.root, argv)
        return self.references[stage]

    def remove_outputs(self, root: Path, stage: str) -> None:
        """What ``dvc repro`` does before it runs a stage: its declared outputs go."""
        for path in declared_outputs(stage):
            target = root / path
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def redirected(stage: str, tag: str) -> list[str]:
    """The stage's dvc.yaml argv with its outputs, metrics and checkpoints under ``scratch/<tag>/``."""
    argv = stage_argv(stage)
    for flag in OUTPUT_FLAGS:
        if flag in argv:
            index = argv.index(flag) + 1
            argv[index] = f"scratch/{tag}/{stage}/{Path(argv[index]).name}"
    return argv


def _remove_redirected(root: Path, argv: list[str]) -> None:
    shutil.rmtree(root / Path(_flag(argv, "--metrics")).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("fault_injection")
    fashion = make_fashion_dir(base / "fashion")
    root = base / "pipeline"
    root.mkdir()
    write_params(root / "params.yaml", {"data.fashion_mnist_dir": str(fashion), **TINY})
    built = Pipeline(root)
    built.build()
    return built


@pytest.fixture(scope="module", autouse=True)
def outcome_table(tmp_path_factory):
    """Writes (and prints) the table of observed outcomes once the module's tests have run."""
    yield
    counts = {kind: sum(row["kind"] == kind for row in OUTCOMES) for kind in
              ("clear error", "recovered", "no effect", "silent wrong", "data lost", "unclear error", "skipped")}
    lines = ["| fault | stage | outcome |", "|---|---|---|"]
    lines += [f"| {row['fault']} | {row['stage']} | {row['kind']}: {row['outcome']} |" for row in OUTCOMES]
    tried = len(OUTCOMES) - counts["skipped"]
    lines += ["", f"faults tried: {tried}; clear errors: {counts['clear error']}; recovered (resumed or finished "
              f"intact): {counts['recovered']}; no effect (exit 0, outputs identical: the stage does not read the file): "
              f"{counts['no effect']}; "
              f"unclear errors: {counts['unclear error']}; silent wrong results: {counts['silent wrong']}; "
              f"data lost: {counts['data lost']}; skipped: {counts['skipped']}"]
    table = "\n".join(lines) + "\n"
    path = tmp_path_factory.getbasetemp() / "fault_injection_table.md"
    path.write_text(table)
    print(f"\nfault injection outcomes ({path}):\n{table}")


# ------------------------------------------------------------------------------------------------
# A stage as a subprocess through the CLI, with a fault at its k-th file rename
# ------------------------------------------------------------------------------------------------

# Every output reaches its final name through os.replace (atomic_path, save_checkpoint), so the k-th
# rename is a point inside the stage's work: between a finished temporary and its rename ("before")
# or just after it ("after"). The action is a real signal to the process, or a pause until told to go.
FAULT_HOOK = r"""
import json, os, resource, signal, sys, time
spec = json.loads(os.environ.pop("SPECTRALAR_FAULT_SPEC"))
if spec["file_size_limit"]:  # writes past it fail with EFBIG (Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_size_limit"],) * 2)
real_replace, calls = os.replace, [0]
# Ctrl-C as a terminal delivers it: a test run launched in the background (`nohup ... &`, a shell without
# job control) starts with SIGINT ignored, which Python and this child inherit; the stage then ran on
# past the injected SIGINT and exited 0.
signal.signal(signal.SIGINT, signal.default_int_handler)

def act():
    if spec["action"] == "pause":
        open(spec["paused"], "w").close()
        while not os.path.exists(spec["go"]):
            time.sleep(0.05)
    else:  # raise(): to this (the main) thread, so Python's handler runs at once, here
        signal.raise_signal(getattr(signal, spec["action"]))

def replace(src, dst, *args, **kwargs):
    calls[0] += os.path.abspath(dst).startswith(os.getcwd() + os.sep)  # the project's files only
    hit = calls[0] == spec["event"] and os.path.abspath(dst).startswith(os.getcwd() + os.sep)
    if hit and spec["when"] == "before":
        act()
    result = real_replace(src, dst, *args, **kwargs)
    if hit and spec["when"] == "after":
        act()
    return result

os.replace = replace
from spectralar.cli import main
sys.exit(main(spec["argv"]))
"""


def _environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ, SPECTRALAR_TRACKING="0", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    for name in ("SPECTRALAR_STAGE_LOCK_HELD", "DVC_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env.update(extra)
    return env


def faulty_cli(root: Path, argv: list[str], *, event: int = 0, when: str = "before", action: str = "none",
               file_size_limit: int = 0, wait: bool = True, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    spec = {"argv": argv, "event": event, "when": when, "action": action, "file_size_limit": file_size_limit,
            "paused": str(root / "paused"), "go": str(root / "go")}
    command = [sys.executable, "-c", FAULT_HOOK]
    env = _environment(SPECTRALAR_FAULT_SPEC=json.dumps(spec), **popen.pop("env", {}))
    if not wait:
        return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **popen)
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300, **popen)


def _checkpoint_steps(root: Path, argv: list[str]) -> list[int]:
    directory = _flag(argv, "--checkpoints")
    if directory is None or not (root / directory).is_dir():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in (root / directory).glob("step_*.pt"))


def _timing(root: Path, argv: list[str]) -> dict:
    metrics = Path(_flag(argv, "--metrics"))
    path = root / metrics.with_name(metrics.stem + ".timing.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


# ------------------------------------------------------------------------------------------------
# 1-2. SIGKILL and SIGINT in the middle of a stage, then a rerun
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", RESUMABLE)
def test_sigkill_at_a_seeded_point_then_the_rerun_gives_the_uninterrupted_outputs(pipeline, stage, tmp_path):
    root = pipeline.copy(tmp_path / "p")
    pipeline.remove_outputs(root, stage)  # as dvc repro does before running the stage
    argv = stage_argv(stage)
    draw = random.Random(f"sigkill {stage}")
    event, when = draw.randint(1, pipeline.renames[stage]), draw.choice(["before", "after"])
    killed = faulty_cli(root, argv, event=event, when=when, action="SIGKILL")
    point = f"SIGKILL {when} rename {event} of {pipeline.renames[stage]}"
    assert killed.returncode == -signal.SIGKILL, f"{point}: exit {killed.returncode}\n{killed.stderr[-3000:]}"
    out = root / _flag(argv, "--out")
    if out.exists():  # killed after the folder was swapped in: then it is the complete one
        assert tree(out) == pipeline.reference(stage)[_flag(argv, "--out")], f"{point}: a partial {out} is left"
    checkpoints = _checkpoint_steps(root, argv)
    left = len(temporaries(root))

    code, err = _run_main(root, argv)  # the rerun, as dvc repro or snakemake would start it
    assert code == 0, f"{point}: rerun {code}\n{err[-3000:]}"
    assert pipeline.outputs(stage, root) == pipeline.reference(stage), f"{point}: the rerun's outputs differ"
    assert not temporaries(root), f"{point}: temporaries left after the rerun: {temporaries(root)}"
    timing = _timing(root, argv)
    resumed = timing.get("resumed_from_step", timing.get("resumed_from_row"))
    if checkpoints and "resumed_from_step" in timing:
        assert resumed == checkpoints[-1], f"{point}: checkpoints {checkpoints}, resumed from {resumed}"
    _record("SIGKILL (seeded rename), then rerun", stage,
            f"{point}; checkpoints left {checkpoints or 'none'}, {left} temporaries; rerun resumed from "
            f"{resumed if resumed is not None else 'n/a (not reported)'} (the dead run's lock released), outputs "
            f"byte-identical", "recovered")


def test_ctrl_c_leaves_no_partial_output_and_the_rerun_resumes(pipeline, tmp_path):
    stage = "train_tokenizer"
    root = pipeline.copy(tmp_path / "p")
    pipeline.remove_outputs(root, stage)
    argv = stage_argv(stage)
    event = random.Random(f"sigint {stage}").randint(1, pipeline.renames[stage])
    interrupted = faulty_cli(root, argv, event=event, when="before", action="SIGINT")
    point = f"SIGINT before rename {event} of {pipeline.renames[stage]}"
    assert interrupted.returncode not in (0, -signal.SIGKILL), \
        f"{point}: exit {interrupted.returncode}\n{interrupted.stderr[-3000:]}"
    assert "KeyboardInterrupt" in interrupted.stderr, interrupted.stderr[-3000:]
    out = root / _flag(argv, "--out")
    if out.exists():
        assert tree(out) == pipeline.reference(stage)[_flag(argv, "--out")], f"{point}: a partial {out} is left"
    assert not temporaries(root), f"{point}: Ctrl-C left temporaries {temporaries(root)}"
    checkpoints, finished = _checkpoint_steps(root, argv), out.exists()

    code, err = _run_main(root, argv)
    assert code == 0, f"{point}: rerun {code}\n{err[-3000:]}"
    assert pipeline.outputs(stage, root) == pipeline.reference(stage), f"{point}: the rerun's outputs differ"
    resumed = _timing(root, argv)["resumed_from_step"]
    assert resumed == (checkpoints[-1] if checkpoints else 0), (checkpoints, resumed)
    _record("SIGINT (Ctrl-C) at a seeded rename, then rerun", stage,
            f"{point}: exit {interrupted.returncode}, output folder {'complete' if finished else 'absent'}, "
            f"no temporaries; checkpoints "
            f"{checkpoints or 'none'}; rerun resumed from step {resumed}, outputs byte-identical", "recovered")


# ------------------------------------------------------------------------------------------------
# 3. Damaged artefacts, for every reader dvc.yaml declares
# ------------------------------------------------------------------------------------------------

def test_every_artefact_a_stage_reads_has_files_to_damage():
    """A new artefact (or reader) in dvc.yaml must be added to DAMAGED_FILES (or NOT_DAMAGED_READERS)."""
    missing = sorted({f"{dep} (read by {reader})" for dep, _, reader in DAMAGE_CASES if dep not in DAMAGED_FILES})
    assert not missing, f"dvc.yaml artefacts with nothing to damage in tests/test_fault_injection.py: {missing}"
    assert set(BUILD) | {"correlation", "evaluate", "report"} == set(DVC), "a new stage: add it to BUILD"


def _flip_offset(path: Path, data: bytes, draw: random.Random) -> int:
    """A byte of content: inside the largest tensor record of a zip (.pt, .npz), past an .npy header,
    anywhere in any other file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # a .pt's tensors are its /data/ records (data.pkl: the rest)
            records = archive.infolist()
            record = max([info for info in records if "/data/" in info.filename] or records,
                         key=lambda info: info.compress_size)
        header = record.header_offset
        start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
            int.from_bytes(data[header + 28:header + 30], "little")
        return start + draw.randrange(max(record.compress_size, 1))
    if path.suffix == ".npy":
        start = np.load(path, mmap_mode="r").offset
        return draw.randrange(start, len(data))
    return draw.randrange(len(data))


def damage(path: Path, how: str) -> str:
    """Damage ``path`` in place; returns what was done."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
        return f"truncated to {len(data) // 2} of {len(data)} bytes"
    if how == "zero":
        path.write_bytes(bytes(len(data)))
        return f"{len(data)} zero bytes"
    offset = _flip_offset(path, data, random.Random(zlib.crc32(str(path.name).encode())))
    flipped = bytearray(data)
    flipped[offset] ^= 1
    path.write_bytes(bytes(flipped))
    return f"bit 0 of byte {offset} of {len(data)} flipped"


@pytest.mark.parametrize("dep, producer, reader", DAMAGE_CASES, ids=[f"{d}->{r}" for d, _, r in DAMAGE_CASES])
def test_a_damaged_artefact_stops_its_reader_with_one_line_naming_it(pipeline, dep, producer, reader):
    """Every reader gets every file flipped (the checksum path each loader must take); truncated and
    zeroed files, which every loader's first read catches, go to the artefact's first reader only."""
    if dep not in DAMAGED_FILES:
        pytest.fail(f"{dep}: no files to damage (see test_every_artefact_a_stage_reads_has_files_to_damage)")
    first_reader = next(r for d, _, r in DAMAGE_CASES if d == dep)
    failures = []
    for name in DAMAGED_FILES[dep]:
        relative = f"{dep}/{name}" if name else dep
        path = pipeline.root / relative
        assert path.is_file(), f"{relative}: not written by the tiny pipeline"
        original = path.read_bytes()
        for how in DAMAGES if reader == first_reader else ("flip",):
            if any(row["stage"] == reader and row["fault"] == f"truncate {relative}" and row["kind"] == "no effect"
                   for row in OUTCOMES):
                break  # the undamaged outputs from a truncated copy: the stage does not open this file
            argv = redirected(reader, f"damage-{how}")
            try:
                what = damage(path, how)
                code, err = _run_main(pipeline.root, argv)
            finally:
                path.write_bytes(original)
            fault = f"{how} {relative}"
            errors = _error_lines(err)
            if code == 2 and len(errors) == 1 and relative in errors[0] and f"rerun {producer}" in errors[0] \
                    and "Traceback" not in err and not (pipeline.root / _flag(argv, "--out")).exists():
                _record(fault, reader, f"exit 2: {errors[0].split(': ', 1)[1][:160]}", "clear error")
            elif code == 0:
                same = pipeline.outputs(reader, pipeline.root, argv) == pipeline.reference(reader)
                _record(fault, reader, f"exit 0 ({what}); outputs {'identical' if same else 'DIFFER'}",
                        "no effect" if same else "silent wrong")
                if not same:
                    failures.append(f"{fault} -> {reader}: exit 0 with different outputs ({what})")
            else:
                _record(fault, reader, f"exit {code}; error lines {errors or err[-300:]!r}", "unclear error")
                failures.append(f"{fault} -> {reader}: exit {code} ({what}); {errors or err[-1500:]!r}")
            _remove_redirected(pipeline.root, argv)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------
# 4. Read-only and full disks
# ------------------------------------------------------------------------------------------------

def _assert_refused_cleanly(root: Path, before: dict, code, err: str, reason: str, fault: str, stage: str) -> None:
    errors = _error_lines(err)
    assert code == 2, f"{fault}: exit {code}\n{err[-3000:]}"
    assert len(errors) == 1 and reason in errors[0] and "Traceback" not in err, err[-3000:]
    assert {path: tree(root / path) for path in before} == before, f"{fault}: the previous outputs changed"
    assert not temporaries(root), f"{fault}: temporaries left {temporaries(root)}"
    _record(fault, stage, f"exit 2: {errors[0].split(': ', 1)[1][:160]}; previous outputs intact, no temporaries",
            "clear error")


def _previous_outputs(root: Path, stage: str) -> dict[str, dict[str, bytes]]:
    return {path: tree(root / path) for path in declared_outputs(stage)}


@pytest.mark.parametrize("variant", ["chmod", "erofs"])
def test_a_read_only_output_folder_is_one_line_and_keeps_the_previous_output(pipeline, tmp_path, monkeypatch, variant):
    stage = "train_generator"
    root = pipeline.copy(tmp_path / "p")
    argv = stage_argv(stage)
    folder = (root / _flag(argv, "--out")).parent.resolve()  # models/: the new folder cannot be swapped in
    before = _previous_outputs(root, stage)
    if variant == "chmod":
        if os.geteuid() == 0:
            _record("read-only output folder (chmod 555)", stage, "running as root, which permission bits do "
                    "not stop", "skipped")
            pytest.skip("running as root: a chmod 555 folder is still writable (the erofs variant runs instead)")
        folder.chmod(0o555)
        try:
            code, err = _run_main(root, argv)
        finally:
            folder.chmod(0o755)
        reason = "Permission denied"
    else:  # what a read-only mount answers, raised for every new name under the folder
        real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace

        def refused(path) -> bool:
            return Path(os.path.abspath(path)).is_relative_to(folder)

        def mkdir(path, *args, **kwargs):
            if refused(path):  # as the kernel answers: an existing name first, then the read-only mount
                code = errno.EEXIST if os.path.exists(path) else errno.EROFS
                raise OSError(code, os.strerror(code), str(path))
            return real_mkdir(path, *args, **kwargs)

        def open_for_write(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if refused(src) or refused(dst):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_for_write)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "replace", replace)
        code, err = _run_main(root, argv)
        monkeypatch.undo()
        reason = "Read-only file system"
    _assert_refused_cleanly(root, before, code, err, reason, f"read-only output folder ({variant})", stage)


def _tmpfs(mount_point: Path, size: int) -> str:
    """Mount a tmpfs of ``size`` bytes; returns why not ('' when mounted)."""
    if os.geteuid() != 0:
        return "not root"
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    return "" if result.returncode == 0 else f"mount -t tmpfs failed: {result.stderr.strip() or result.returncode}"


def _full_disk_under(folder: Path, monkeypatch) -> None:
    """Every fsync of a file under ``folder`` fails with ENOSPC, as on a full disk (until monkeypatch.undo)."""
    real_fsync = os.fsync

    def disk_full(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)


@pytest.mark.parametrize("variant", ["tmpfs", "enospc", "rlimit"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_output(pipeline, tmp_path, monkeypatch, variant):
    stage = "train_generator"
    root = pipeline.copy(tmp_path / "p")
    argv = stage_argv(stage)
    out = root / _flag(argv, "--out")
    if variant == "tmpfs":
        # the output folder on a tmpfs that holds the previous output but not a second copy beside it
        mount = root / "full"
        size = sum(len(b) for b in tree(out).values()) + 16 * 1024
        why = _tmpfs(mount, size)
        if why:
            _record("full disk (a small tmpfs)", stage, why, "skipped")
            pytest.skip(f"no tmpfs: {why} (the enospc and rlimit variants run instead)")
        try:
            shutil.copytree(out, mount / "generator")
            argv[argv.index("--out") + 1] = "full/generator"
            before = {"full/generator": tree(mount / "generator")}
            code, err = _run_main(root, argv)
            _assert_refused_cleanly(root, before, code, err, "No space left on device", "full disk (tmpfs)", stage)
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
        return
    before = _previous_outputs(root, stage)
    if variant == "enospc":
        _full_disk_under(out.parent.resolve(), monkeypatch)
        code, err = _run_main(root, argv)
        monkeypatch.undo()
        _assert_refused_cleanly(root, before, code, err, "No space left on device", "full disk (ENOSPC at fsync)",
                                stage)
    else:  # the kernel refuses writes past a file-size limit (SIGXFSZ is ignored by Python: EFBIG)
        limit = 4096
        result = faulty_cli(root, argv, file_size_limit=limit)
        _assert_refused_cleanly(root, before, result.returncode, result.stderr, "File too large",
                                f"full disk (RLIMIT_FSIZE {limit} bytes: EFBIG)", stage)


@pytest.mark.parametrize("stage", list(DVC))
def test_every_stage_on_a_full_disk_is_one_line_and_keeps_its_previous_output(pipeline, tmp_path, monkeypatch,
                                                                                stage):
    """ENOSPC from every fsync inside the project, whatever the stage writes first (checkpoint,
    model file, shard, table, metrics, report), e.g. save_domain_net's model file in train_evalnet."""
    root = pipeline.copy(tmp_path / "p")
    argv = stage_argv(stage)
    before = _previous_outputs(root, stage)
    _full_disk_under(root.resolve(), monkeypatch)
    code, err = _run_main(root, argv)
    monkeypatch.undo()
    _assert_refused_cleanly(root, before, code, err, "No space left on device", "full disk (ENOSPC at every fsync)",
                            stage)


# ------------------------------------------------------------------------------------------------
# 5. Two writers of one stage output at once
# ------------------------------------------------------------------------------------------------

def test_a_second_run_of_a_running_stage_is_refused_and_the_first_finishes_intact(pipeline, tmp_path):
    stage = "train_generator"
    root = pipeline.copy(tmp_path / "p")
    pipeline.remove_outputs(root, stage)
    argv = stage_argv(stage)
    first = faulty_cli(root, argv, event=1, when="before", action="pause", wait=False)  # holds the lock, mid-run
    try:
        deadline = time.monotonic() + 240
        while not (root / "paused").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never reached its first rename"
            time.sleep(0.05)
        code, err = _run_main(root, argv)  # the second writer, while the first is mid-stage
    finally:
        (root / "go").touch()
        _, first_err = first.communicate(timeout=300)
    errors = _error_lines(err)
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert f"is already running in process {first.pid}" in errors[0], errors[0]
    assert first.returncode == 0, first_err[-3000:]
    assert pipeline.outputs(stage, root) == pipeline.reference(stage)
    assert not temporaries(root)
    _record("the same stage started twice at once", stage,
            f"second refused at once (exit 2: names process {first.pid}); first finished, outputs byte-identical",
            "clear error")


# ------------------------------------------------------------------------------------------------
# 6. MLflow: concurrent writers to one sqlite store, and a store that cannot be used
# ------------------------------------------------------------------------------------------------

def _store_runs(db: Path) -> dict[str, dict]:
    """{stage: {status, parent, metrics, artifacts}} of the stage runs in a sqlite store (read with sqlite3)."""
    with sqlite3.connect(db) as connection:
        runs = {}
        for run_id, status, artifact_uri in connection.execute("SELECT run_uuid, status, artifact_uri FROM runs"):
            tags = dict(connection.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
            if tags.get("spectralar.role") != "stage":
                continue
            metrics = {key for (key,) in connection.execute("SELECT key FROM latest_metrics WHERE run_uuid = ?",
                                                            (run_id,))}
            directory = Path(artifact_uri.removeprefix("file://"))
            runs[tags["spectralar.stage"]] = {"status": status, "parent": tags.get("mlflow.parentRunId"),
                                              "metrics": metrics, "artifacts": tree(directory)}
    return runs


def test_two_stage_processes_log_into_one_sqlite_store(pipeline, tmp_path):
    root = pipeline.copy(tmp_path / "p")
    db = tmp_path / "store" / "mlflow.db"
    env = {"SPECTRALAR_TRACKING": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    stages = ("train_evalnet", "dump_tokens")
    argvs = {stage: redirected(stage, "tracked") for stage in stages}
    processes = {stage: faulty_cli(root, argvs[stage], wait=False, env=env) for stage in stages}  # no fault
    results = {stage: process.communicate(timeout=300) for stage, process in processes.items()}
    for stage, process in processes.items():
        assert process.returncode == 0, results[stage][1][-3000:]
        assert "MLflow tracking off" not in results[stage][1], results[stage][1][-3000:]
        assert pipeline.outputs(stage, root, argvs[stage]) == pipeline.reference(stage), f"{stage}: outputs differ"
    runs = _store_runs(db)
    assert set(runs) == set(stages), runs.keys()
    for stage in stages:
        run = runs[stage]
        assert run["status"] == "FINISHED" and "stage_seconds" in run["metrics"], (stage, run["status"], run["metrics"])
        assert Path(_flag(argvs[stage], "--metrics")).name in run["artifacts"], (stage, sorted(run["artifacts"]))
    assert runs[stages[0]]["parent"] is not None and runs[stages[0]]["parent"] == runs[stages[1]]["parent"]
    _record("two stage processes logging into one sqlite store at once", " + ".join(stages),
            "both exit 0 with the untracked outputs; both runs FINISHED with metrics and metrics file, one parent run",
            "recovered")


@pytest.mark.parametrize("store", ["not_a_database", "a_folder"])
def test_an_unusable_mlflow_store_warns_and_loses_no_result(pipeline, tmp_path, monkeypatch, store):
    """A store file that is not a database, and a folder at the database path (refused before MLflow
    sees it: MLflow would retry opening it for ~100 s)."""
    stage = "train_evalnet"
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    if store == "a_folder":
        db.mkdir()
        (db / "keep.txt").write_text("a user's file")
    else:
        db.write_bytes(b"not an sqlite database\n" * 100)
    content = tree(db)
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    argv = redirected(stage, f"store-{store}")
    code, err = _run_main(pipeline.root, argv)
    try:
        assert code == 0, err[-3000:]
        assert pipeline.outputs(stage, pipeline.root, argv) == pipeline.reference(stage)
        warnings = [line for line in err.splitlines() if "MLflow tracking off" in line]
        assert warnings and " WARNING " in warnings[0], err[-3000:]
        assert tree(db) == content  # a store it cannot use is left as it was
        if store == "a_folder":
            assert "is a folder, not an sqlite database" in warnings[0]
    finally:
        _remove_redirected(pipeline.root, argv)
    _record(f"MLflow store unusable ({store.replace('_', ' ')})", stage,
            f"exit 0, outputs identical; warned: {warnings[0].split(': ', 1)[1][:140]}", "recovered")
