# Crucible: `make demo` runs the main job end to end; `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PIP_FLAGS ?= -q

.PHONY: setup test-deps demo test lint openapi bench-memory bench-throughput bench-quality clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

# Test-only tools in side venvs: olah (the Hub stand-in) pins packages of its own, and
# mergekit 0.1.5 is the reference implementation the method tests compare against;
# FusionBench 0.2.33 (its own pins too) is the reference for tsv, iso_c, iso_cts and wudi.
.venv-olah/.installed:
	$(PYTHON) -m venv .venv-olah
	.venv-olah/bin/pip install $(PIP_FLAGS) olah
	touch $@

.venv-mergekit/.installed:
	$(PYTHON) -m venv .venv-mergekit
	.venv-mergekit/bin/pip install $(PIP_FLAGS) torch==2.13.0 mergekit==0.1.5
	touch $@

.venv-fusionbench/.installed:
	$(PYTHON) -m venv .venv-fusionbench
	.venv-fusionbench/bin/pip install $(PIP_FLAGS) torch==2.13.0 fusion-bench==0.2.33
	touch $@

# s3rver (npm): the real S3-compatible server the sink and artifact-store tests run against.
.tools/node_modules/.bin/s3rver:
	mkdir -p .tools
	npm install --prefix .tools --no-audit --no-fund --silent s3rver@3.7.1

setup: $(VENV)/.installed

test-deps: setup .venv-olah/.installed .venv-mergekit/.installed .venv-fusionbench/.installed \
	.tools/node_modules/.bin/s3rver

demo: setup
	$(VENV)/bin/python scripts/demo.py

test: test-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

openapi: setup
	$(VENV)/bin/crucible openapi

bench-memory: setup
	$(VENV)/bin/python bench/memory.py

# Crucible vs mergekit 0.1.5 vs the disk floor on base + 4 Llama-shaped experts of 1.29 GB
# (bf16; generated once into $$CRUCIBLE_BENCH_THROUGHPUT_CACHE or
# ~/.cache/crucible/bench-throughput, 6.5 GB); writes bench/throughput/RESULTS.md.
# Cold-cache runs drop the page cache (root) or fadvise the inputs out.
bench-throughput: setup .venv-mergekit/.installed
	$(VENV)/bin/python bench/throughput/run.py --runs 3 --cache both $(BENCH_ARGS)

# Real fine-tuned MiniLM experts on fortunes tasks (generated once, ~30 min on 2 CPU cores,
# cached in $$CRUCIBLE_BENCH_CACHE or ~/.cache/crucible/bench-quality), every method through
# the service; writes bench/quality/RESULTS.md. Needs Debian's `fortunes` package.
bench-quality: setup
	$(VENV)/bin/python bench/quality/run.py $(BENCH_ARGS)

clean:
	rm -rf .demo .data
