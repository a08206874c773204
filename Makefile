# psp-pipeline: `make demo` runs the pipeline on the embedded sample, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup lint test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

# One pytest run on two processes, a whole file at a time: the end-to-end runs (`slow`: real Ray instances,
# servers, dvc repro) wait on processes and servers much of the time, and the unit files fill in beside them.
# Each worker has its own temporary folder, removed when the run ends, so two local Ray instances never meet and
# no cache outlives the run (tests/conftest.py). `--no-loadscope-reorder`: xdist would otherwise hand out the files
# with the most tests first, whatever their length, and the one-test end-to-end files would start last.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

demo: setup
	dvc repro
	@echo
	@echo "Reconstruction grid: reports/eval_grid.png   (inputs over outputs)"
	@echo "Metrics:             reports/eval.json, reports/train.json, reports/invert.json, reports/edit.json"
	@cat reports/eval.json
	@echo "W+ latents:          data/latents/*.parquet"
	@echo "SeFa edit grid:      data/edits/grids/sefa-0.png   (rows = images, columns = strengths; sefa-1, sefa-2 beside it)"
	@echo "MLflow UI:           $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db  (then open http://127.0.0.1:5000)"

clean:
	rm -rf $(VENV) .pytest_cache
