# normpilot: every target sets itself up. `make train` and `make test` are the README's
# two commands; both create .venv on first use and install the pinned, tested set.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Until the trainer lands (issue 3/4), `train` runs the norms demo: BN vs Batch Renorm
# on a learnable synthetic task at batch 2.
train: $(STAMP)
	$(PY) -m norms.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/norms.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results
