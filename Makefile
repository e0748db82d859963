# One command runs the main job (make demo), one passes the tests (make test).
# Each sets itself up into a local virtual environment (.venv) first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Keep every tool's state inside the project; telemetry off; no hub downloads in tests.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export GIT_PYTHON_REFRESH := quiet
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup test test-fast demo lint format bench app clean mlflow-ui prefect-ui

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

# Everything but the end-to-end DVC, Prefect and sweep tests (marked slow); under 90 s on 2 cores.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	@test -d .git || (git init -q && git add -A && git -c user.name=inpformer -c user.email=inpformer@localhost commit -qm "initial" )
	@test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc repro
	@echo; echo "Per-category metrics (artifacts/eval/metrics.md):"; cat artifacts/eval/metrics.md
	@$(BIN)/python -c "import json;s=json.load(open('artifacts/train_summary.json'));print('encoder pretrained:', {g:v.get('encoder_pretrained') for g,v in s.get('groups',{}).items()})"

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/model_speed.py
	$(BIN)/python bench/metrics_speed.py
	$(BIN)/python bench/data_speed.py
	$(BIN)/python bench/inference_speed.py

app: setup
	$(BIN)/inpformer app

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

clean:
	rm -rf artifacts data/prepared data/synth data/cache .prefect .cache
