# One set of checks everywhere: CI calls these same targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so a CPU-only machine installs the CPU build instead of gigabytes of CUDA wheels.
# On a GPU machine: make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=<your CUDA wheel index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# Optional extras on top of [dev]: make install EXTRAS=ray adds Ray for `score --engine ray`.
EXTRAS ?=
comma := ,
space := $(subst ,, )
PIP_EXTRAS := dev$(if $(EXTRAS),$(comma)$(EXTRAS),)
# One stamp per set of extras, so `make install EXTRAS=ray` after a plain install installs Ray.
STAMP_NAME := .installed-$(subst $(comma),-,$(subst $(space),,$(PIP_EXTRAS)))

DB ?= mfbatch.duckdb
EXPORT_DIR ?= export
DATASET ?= ml-1m
SOURCE ?=
TOPK ?= 20
PREPROCESS_FLAGS ?=
TRAIN_FLAGS ?=
SCORE_FLAGS ?=
EVALUATE_FLAGS ?=
CONFIG ?=
# TUNE=1: `make all` runs `mfbatch tune` before train (TUNE_FLAGS: e.g. --trials 30 --timeout 600).
TUNE ?=
TUNE_FLAGS ?=
SOURCE_FLAG := $(if $(SOURCE),--source $(SOURCE),)
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG),)
MFBATCH := $(BIN)/mfbatch
# What the targets below need first: the stamp of `make install`. INSTALL_STAMP= (empty)
# runs them with the environment in BIN as it is, installing nothing (tests/test_make_all.py).
INSTALL_STAMP ?= $(BIN)/$(STAMP_NAME)
# `make all` without DATASET= or SOURCE= runs on ML-1M when it is cached or can be
# downloaded, and otherwise on synthetic data of ML-1M's shape (6,040 users x 3,706 items,
# ~880k ratings), saying so: the first command works on a machine without network.
FALLBACK_FLAGS ?= --users 6040 --items 3706 --ratings-per-user 165
AUTO_DATA := $(if $(SOURCE),,$(filter file,$(origin DATASET)))

# gpu-check runs where only torch (CUDA) and numpy may be installed: any python3 there.
GPU_PYTHON ?= python3
ML100K ?=

.PHONY: help install test lint bench bench-quality gpu-check all preprocess tune train evaluate refit score clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(BIN)/$(STAMP_NAME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[$(PIP_EXTRAS)]'
	@touch $@

install: $(BIN)/$(STAMP_NAME) ## Create .venv: pinned torch, then mfbatch with [dev] (EXTRAS=ray: + Ray)

test: $(INSTALL_STAMP) ## Run the test suite
	$(BIN)/python -m pytest

lint: $(INSTALL_STAMP) ## ruff + mypy
	$(BIN)/ruff check mfbatch tests benchmarks
	$(BIN)/ruff format --check mfbatch tests benchmarks
	$(BIN)/mypy

bench: $(INSTALL_STAMP) ## Benchmarks (not part of the test run); results in bench-results/
	@mkdir -p bench-results
	$(BIN)/python benchmarks/bench_preprocess.py --out bench-results/preprocess.json
	$(BIN)/python benchmarks/bench_train.py --out bench-results/train.json
	$(BIN)/python benchmarks/bench_score.py --out bench-results/score.json

bench-quality: $(INSTALL_STAMP) ## Quality on every data set of ../shared/data -> docs/quality-table.md + .json
	$(BIN)/python benchmarks/bench_quality.py --all --data $(or $(DATA),../shared/data)

gpu-check: ## GPU tests (marker gpu) + GPU benchmarks, < 5 min; figures in bench-results/gpu.json
	@mkdir -p bench-results
	timeout 300 $(GPU_PYTHON) benchmarks/bench_gpu.py --tests --out bench-results/gpu.json \
		$(if $(ML100K),--ml100k $(ML100K),)

preprocess: $(INSTALL_STAMP) ## Stage 1: ratings -> DuckDB (DATASET=, SOURCE=)
ifeq ($(AUTO_DATA),file)
	@if why=$$($(BIN)/python -c 'import sys; from mfbatch.data.download import main; \
			sys.exit(main(sys.argv[1:]))' $(DATASET) 2>&1 >/dev/null); then \
		echo "make: running on $(DATASET) (real ratings)"; \
		set -x; $(MFBATCH) preprocess $(CONFIG_FLAG) --dataset $(DATASET) --db $(DB) $(PREPROCESS_FLAGS); \
	else \
		echo "make: $(DATASET) unavailable ($${why%%;*}); running on built-in synthetic ratings" \
			"of ML-1M's shape instead; for real data: make all SOURCE=path/to/ml-1m.zip," \
			"or mfbatch preprocess --dataset csv --source FILE (README: Your own data)"; \
		set -x; $(MFBATCH) preprocess $(CONFIG_FLAG) --dataset synthetic $(FALLBACK_FLAGS) --db $(DB) $(PREPROCESS_FLAGS); \
	fi
else
	$(MFBATCH) preprocess $(CONFIG_FLAG) --dataset $(DATASET) $(SOURCE_FLAG) --db $(DB) $(PREPROCESS_FLAGS)
endif

tune: $(INSTALL_STAMP) ## Search train settings on an inner split of train; train applies them
	$(MFBATCH) tune $(CONFIG_FLAG) --db $(DB) $(TUNE_FLAGS)

train: $(INSTALL_STAMP) ## Stage 2: train on train, early-stop on val, export ONNX (the validated run)
	$(MFBATCH) train $(CONFIG_FLAG) --db $(DB) --export-dir $(EXPORT_DIR) $(TRAIN_FLAGS)

evaluate: $(INSTALL_STAMP) ## Measure the validated run on its own lists vs popularity
	$(MFBATCH) evaluate $(CONFIG_FLAG) --db $(DB) --top-k $(TOPK) $(EVALUATE_FLAGS)

refit: $(INSTALL_STAMP) ## The serving model: refit on train+val with the validated run's settings
	$(MFBATCH) train $(CONFIG_FLAG) --db $(DB) --export-dir $(EXPORT_DIR) --on all

score: $(INSTALL_STAMP) ## Stage 3: serve top-K unrated items for every user into DuckDB
	$(MFBATCH) score $(CONFIG_FLAG) --db $(DB) --top-k $(TOPK) $(SCORE_FLAGS)

all: ## The whole job: preprocess -> [tune, TUNE=1] -> train -> evaluate -> refit -> score
	$(MAKE) --no-print-directory preprocess
	$(if $(TUNE),$(MAKE) --no-print-directory tune,)
	$(MAKE) --no-print-directory train
	$(MAKE) --no-print-directory evaluate
	$(MAKE) --no-print-directory refit
	$(MAKE) --no-print-directory score

clean: ## Remove the venv, caches, databases and exported models
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results
	rm -f $(DB) $(DB).wal
	find export -mindepth 1 ! -name README.md -exec rm -rf {} +
