# One command to start: `make demo`. Tests: `make test`. Both install into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ccsr-installed
CLASS ?= giraffe

# Offline: the embedded tiny models are built locally; nothing is downloaded.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR := $(CURDIR)/.cache/ultralytics
export CCSR_CACHE ?= $(CURDIR)/.cache/ccsr-tiny
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench lint format clean e2e proof gpu-check

install: $(STAMP)

# torch is pinned here (not in pyproject) so GPU users keep their own build: unpinned torch pulls
# several GB of CUDA wheels, and torch 2.13 has no working torchvision on PyPI.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/ccsr run --config configs/tiny.yaml --class $(CLASS) --run-dir runs/$(CLASS)
	@$(VENV)/bin/ccsr status runs/$(CLASS) --json > runs/$(CLASS)/status.json
	@echo "run directory: runs/$(CLASS)  (status: $(VENV)/bin/ccsr status runs/$(CLASS))"

test: install
	$(PY) -m pytest -q -ra

bench: install
	TQDM_DISABLE=1 $(PY) -m benchmarks.run

# One iteration at the paper's model sizes with random weights (no download), timed per stage, written to
# runs/gpu-check/results.json; without CUDA the same at tiny geometry on the CPU (docs/performance.md).
gpu-check: install
	TQDM_DISABLE=1 $(PY) -m benchmarks.gpu_check

# The shapes world (docs/proof.md): base model trained from scratch, the loop and its variants, docs/proof.json.
proof: install
	$(PY) -m experiments.shapes.proof --fresh --jobs 2

# The demo plus the HTML report and, when Debian's chromium is installed, a screenshot of it.
e2e: install
	rm -rf runs/e2e-$(CLASS)
	$(VENV)/bin/ccsr run --config configs/tiny.yaml --class $(CLASS) --run-dir runs/e2e-$(CLASS) --iterations 2
	$(VENV)/bin/ccsr status runs/e2e-$(CLASS) --json > runs/e2e-$(CLASS)/status.json
	$(VENV)/bin/ccsr report runs/e2e-$(CLASS)
	@if [ -x /usr/bin/chromium ]; then /usr/bin/chromium --headless --no-sandbox --disable-gpu \
	  --disable-background-networking --disable-component-update --disable-sync --no-first-run \
	  --user-data-dir=$$(mktemp -d) --screenshot=$(CURDIR)/runs/e2e-$(CLASS)/report/screenshot.png \
	  --window-size=1280,2000 file://$(CURDIR)/runs/e2e-$(CLASS)/report.html; \
	  echo "screenshot: runs/e2e-$(CLASS)/report/screenshot.png"; fi

lint: install
	$(VENV)/bin/ruff check ccsr tests benchmarks experiments
	$(VENV)/bin/ruff format --check ccsr tests benchmarks experiments

format: install
	$(VENV)/bin/ruff format ccsr tests benchmarks experiments
	$(VENV)/bin/ruff check --fix ccsr tests benchmarks experiments

clean:
	rm -rf runs .cache .pytest_cache
