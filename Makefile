# Two commands on a fresh machine: `make demo` (the whole system on a generated sample) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_out
RUN_DATE ?= $(shell date -u +%F)
# The demo's sample: 400 movies with posters of real poster size (300x450), a CNN at 64 px trained by
# 2 Ray Train workers that share this machine's CPUs with Ray Data's decoding.
DEMO_MOVIES ?= 400
DEMO_TRAIN_FLAGS ?= --arch cnn --image-size 64 --epochs 10 --batch-size 16 --lr 3e-3 --num-workers 2 \
	--cpus-per-worker 0.5 --val-fraction 0.2

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO)
	$(PY) jobs/build_catalog.py --sample $(DEMO_MOVIES) --out $(DEMO)/sample
	$(PY) jobs/train_genre_model.py --catalog $(DEMO)/sample/catalog.parquet $(DEMO_TRAIN_FLAGS) \
		--storage-path $(abspath $(DEMO))/runs --name demo-cnn
	$(PY) jobs/label_catalog.py --catalog $(DEMO)/sample/catalog.parquet --model $(DEMO)/runs/demo-cnn/model \
		--output $(DEMO)/labels --run-date $(RUN_DATE)
	$(PY) jobs/evaluate.py --labels $(DEMO)/labels --catalog $(DEMO)/sample/catalog.parquet --split test \
		--out $(DEMO)/evaluation
	$(PY) jobs/query_labels.py --labels $(DEMO)/labels --query latest --limit 5

# The venv's bin first on PATH: tests run its command-line tools (ray, hadolint) as a user's shell would.
test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO) .pytest_cache
