# DeepSeek Workbench. `make run` is the main job, `make test` runs the tests; both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A GPU box that already has a CUDA torch keeps it (the venv sees the system packages); anywhere else we
# install the CPU build of torch that this kind of machine carries, never a multi-GB CUDA download.
HAS_CUDA_TORCH := $(shell $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && echo 1)
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run demo test test-fast lint format bench tokenizer tiny-checkpoint lab clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(if $(HAS_CUDA_TORCH),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## the main job: execute every lesson (classroom scale) and build the book site in book/_build/html
run: setup
	$(BIN)/python scripts/build_book.py

## the end-to-end tour on the command line: train the tiny model and report what it learned
demo: setup
	$(BIN)/python -m workbench demo --out runs/demo

## JupyterLab on the lessons, with the project's kernel
lab: setup
	$(BIN)/jupyter lab notebooks/

## every test (CPU; GPU tests skip without CUDA) and the lint check
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

## workbench vs transformers' DeepseekV3ForCausalLM, same config, tokens/s side by side
bench: setup
	$(BIN)/python benchmarks/bench_train_vs_hf.py

## regenerate the shipped artefacts in data/
tokenizer: setup
	$(BIN)/python scripts/make_tokenizer.py

tiny-checkpoint: setup
	$(BIN)/python scripts/make_tiny_checkpoint.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache book/_build book/lessons
