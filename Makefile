# Two commands get a newcomer from clone to results:
#   make run    set up, then run the default pipeline on the embedded dataset (an MLflow run)
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export MPLBACKEND := Agg
# two pytest workers, each test module whole on one worker (modules share a project fixture)
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup setup-cpu run test viz mlflow-ui bench clean notebooks review

$(BIN)/kedro: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/kedro

setup: $(BIN)/kedro

# CPU-only machines: the registry's torch is a CUDA build that cannot import without its NVIDIA
# libraries, so the smallest working set is the normal install minus triton (the GPU compiler).
setup-cpu: setup
	$(BIN)/python -m pip uninstall --quiet --yes triton
	$(BIN)/python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'works on CPU without triton')"

run: setup
	$(BIN)/kedro run $(if $(PIPELINE),--pipeline=$(PIPELINE)) $(if $(ENV),--env=$(ENV))

# tests/test_deploy.py runs in a pytest process of its own: inside a pytest-xdist worker that ran other
# modules first, its no-torch child run took the worker down and the suite hung (measured twice, not
# when the module runs alone; cause not found). Its 5 tests take about 25 s.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) --ignore=tests/test_deploy.py
	$(BIN)/python -m pytest tests/test_deploy.py

# JupyterLab for notebooks/ (the optional extra), then open it in the project's Kedro session
notebooks: setup
	$(BIN)/python -m pip install --quiet -e ".[notebooks]"
	@echo "JupyterLab installed: $(BIN)/kedro jupyter lab --no-browser"

# the review station on a trained model (prints its address; METHOD=patchcore by default)
review: setup
	$(BIN)/kedro review --method=$(or $(METHOD),patchcore) $(if $(ENV),--env=$(ENV))

viz: setup
	$(BIN)/kedro viz run

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

bench: setup
	$(BIN)/python benchmarks/bench_metrics.py

clean:
	rm -rf data/02_intermediate data/04_feature data/06_models data/07_model_output data/08_reporting mlruns mlflow.db
