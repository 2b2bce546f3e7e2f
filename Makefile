# normpilot: every target sets itself up. `make train` and `make test` are the README's
# two commands; both create .venv on first use and install the pinned, tested set.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train demo test lint docs bench bench-threads bench-image-check bench-loader study study-cls study-det study-scenes gpu-check gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The default config (FCOS detector on the embedded shapes data); re-running resumes.
train: $(STAMP)
	$(PY) -m trainer train --config configs/shapes_det.yaml

# BN vs Batch Renorm vs GroupNorm on a small synthetic task at batch 2 (~15 s).
demo: $(STAMP)
	$(PY) -m norms.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

# Every results table in README.md and docs/ regenerated from bench/results/ (a test
# fails when one is stale).
docs: $(STAMP)
	$(PY) docs/generate.py

# Speed: per-layer norms table, then trainer overhead / data pipeline / DDP (~9 min).
bench: $(STAMP)
	$(PY) -m bench.layers
	$(PY) -m bench.speed

# Training images/s with run.threads=auto against torch's default threads, 1 and 2 processes.
bench-threads: $(STAMP)
	$(PY) -m bench.threads

# Loading (decode + augmentation) per worker against the training step's demand (~1 min).
bench-loader: $(STAMP)
	$(PY) -m bench.loader

# Start-up cost of the image check (header / full decode) at 2k and 118k COCO-size JPEGs;
# needs ~10 GB in $$TMPDIR for a while (the 118k files), root for the cold-cache cells.
bench-image-check: $(STAMP)
	$(PY) -m bench.image_check

# The small-batch studies; both keep one file per finished cell and continue where they
# stopped.  `--quick` versions run in make test.
# The committed classification grid: 5 seeds in every cell; the 2-process lines are read
# from the 1-process cells at 2B.
# `make study` runs all three: every table, plot and JSON in bench/results/study_*.*,
# and the offline wandb runs (one per training run, grouped per cell) in bench/results/wandb.
study: study-cls study-det study-scenes

STUDY_NORMS := bn brn brn_m01 brn_paper gn
study-cls: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m bench.study --norms $(STUDY_NORMS) --seeds 5

# The detection grid: bn, brn, gn_ws, auto at B=16..1 and syncbn, syncbrn, auto2 on 2
# gloo processes at B=4, 2, 1; 3 seeds, 5 at B=8 and 2 x 2 (lines within a point there:
# brn and gn_ws, syncbn and syncbrn); then the report over the whole grid.  Every run sees
# 4000 samples and takes at least the B=8 run's 500 steps (the B=16 runs: 500, not 250).
study-det: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m bench.study_det --seeds 3
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m bench.study_det --seeds 5 --batches 8 --sync-batches 2
	$(PY) -m bench.study_det --report-only --seeds 5 --no-wandb

# The scenes grid at the preset's own sizing: bn, brn, gn_ws, auto at B=8..1, syncbn,
# syncbrn, auto2 at 2 x 2 and 2 x 1; seed by seed, so an interrupted grid keeps whole seeds.
study-scenes: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m bench.study_det --preset scenes --seeds 5

# The GPU acceptance run (bench/gpu_check.py): pytest -m cuda, then the GPU targets side by
# side, into bench/results/gpu_check.{json,md}; <= 8 minutes on one GPU.  It uses the
# machine's own python3 (torch + torchvision there) and installs nothing from the network:
# the packages that machine lacks come from .whl/ (made here by `make gpu-wheels`).
GPU_SITE ?= /tmp/normpilot-site
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps \
		--no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$$PWD python3 -m bench.gpu_check

# Wheels for a GPU machine with python 3.12 and torch but without the config, COCO and
# tracking packages (wandb runs disabled there); downloaded from the package index here.
GPU_WHEELS := $(shell grep -iE "^(omegaconf|antlr4-python3-runtime|pyyaml|pycocotools)==" constraints.txt)
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results/wandb bench/results/*_quick.*
