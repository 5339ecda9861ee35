# Two commands on a fresh machine: `make demo` (the whole system on a generated sample) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_out
RUN_DATE ?= $(shell date -u +%F)
NEXT_DATE ?= $(shell date -u -d tomorrow +%F)
# The demo's sample: 800 movies with posters of real poster size (300x450). The recipe for real posters
# (a pretrained EfficientNet-Lite0, head on cached features, then the whole network) at 128 px and with a
# faster head, by 2 Ray Train workers that share this machine's CPUs with Ray Data's decoding.
DEMO_MOVIES ?= 800
DEMO_TRAIN_FLAGS ?= --arch efficientnet_lite0 --image-size 128 --head-lr 1e-3 --epochs 2 --lr 3e-4 \
	--backbone-lr-scale 0.3 --batch-size 16 --num-workers 2 --cpus-per-worker 0.5 --val-fraction 0.2

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The demo's terminal shows the jobs' own lines and Ray's warnings; Ray's INFO lines and its workers' output (the
# training epochs, Ray Data's plans) stay in the Ray session's log files, /tmp/ray/session_latest/logs.
demo: export RAY_LOG_TO_DRIVER = 0
demo: install
	rm -rf $(DEMO)
	@echo "== 1/6 A sample catalogue: $(DEMO_MOVIES) movies, posters drawn from their genres"
	$(PY) jobs/build_catalog.py --sample $(DEMO_MOVIES) --out $(DEMO)/sample
	@echo "== 2/6 Fine-tune a pretrained EfficientNet-Lite0 with Ray Train (a few minutes on a laptop's CPUs)"
	$(PY) jobs/train_genre_model.py --catalog $(DEMO)/sample/catalog.parquet $(DEMO_TRAIN_FLAGS) \
		--storage-path $(abspath $(DEMO))/runs --name demo-lite0
	@echo "== 3/6 Label the catalogue with Ray Data: night $(RUN_DATE)"
	$(PY) jobs/label_catalog.py --catalog $(DEMO)/sample/catalog.parquet \
		--model $(DEMO)/runs/demo-lite0/model --output $(DEMO)/labels --run-date $(RUN_DATE)
	@echo "== 4/6 The next night: nothing changed, so nothing is scored; every row is carried over"
	$(PY) jobs/label_catalog.py --catalog $(DEMO)/sample/catalog.parquet \
		--model $(DEMO)/runs/demo-lite0/model --output $(DEMO)/labels --run-date $(NEXT_DATE)
	@echo "== 5/6 The labels table in SQL"
	$(PY) jobs/query_labels.py --labels $(DEMO)/labels --query latest --limit 5
	@echo "== 6/6 The night's labels against the true genres of the test split (movies the model never saw)"
	$(PY) jobs/evaluate.py --labels $(DEMO)/labels --catalog $(DEMO)/sample/catalog.parquet --split test \
		--model $(DEMO)/runs/demo-lite0/model --out $(DEMO)/evaluation

# The venv's bin first on PATH: tests run its command-line tools (ray, hadolint) as a user's shell would.
test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO) .pytest_cache
