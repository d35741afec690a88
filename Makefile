# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

# --no-compile: pip would byte-compile every installed module (a minute on 2 cores, most never imported); Python
# compiles what is imported, once, on first import.
$(STAMP): requirements.txt requirements-test.txt requirements-test-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-compile --no-deps -c constraints.txt -r requirements-test-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Trains the embedded tiny Flux on the procedural demo set (a few minutes on a CPU), then samples the
# exported pipeline: workdir/demo/{loss_curve.png,sample_grid.png,samples/}. Rerunning resumes / skips.
demo: $(STAMP)
	$(PY) -m d4k_jax.train --config=configs/flux_wlf.py:tiny --workdir=workdir/demo
	$(PY) -m d4k_jax.sample --config=configs/flux_wlf.py:tiny --config.pipeline=workdir/demo/pipeline \
		--prompts=workdir/demo/eval_prompts.txt --outdir=workdir/demo/final --config.sample.format=png

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) workdir .jax_cache
