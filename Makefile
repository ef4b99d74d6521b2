# Everything a fresh machine needs is installed by these targets: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-run

.PHONY: lock fresh-check demo test test-fast browser bench bench-extract bench-sae bench-explorer bench-compare bench-sparsify bench-saelens bench-deepapl clean

# The venv is rebuilt when pyproject.toml or the lock changes. requirements-lock.txt pins every package, transitive
# ones included, with hashes (`make lock` writes it), so every machine installs the same set: --no-deps installs the
# lock exactly as written, and pip refuses a file whose hash differs. cytosae itself goes in last, editable, without
# dependencies (all are in the lock) and without a build environment (setuptools is in the lock too).
$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements-lock.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# requirements-lock.txt: every package of the venv at an exact version with hashes (pip-compile in a throwaway venv).
lock:
	PYTHON=$(PYTHON) scripts/lock.sh

# From nothing, as a new user's machine: a clean clone in a temporary folder, pip's cache off, then the README's two
# commands; times and results in fresh-check.json.
fresh-check:
	scripts/fresh_check.sh

# Debian's chromium drives the browser tests; Playwright never downloads a browser of its own.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and no root: browser tests will be skipped"; fi; fi

demo: $(STAMP)
	$(BIN)/cytosae demo --out $(DEMO_OUT)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

bench: bench-extract bench-sae bench-explorer

bench-extract: $(STAMP)
	$(BIN)/python bench/extract.py

bench-sae: $(STAMP)
	$(BIN)/python bench/sae.py

bench-explorer: $(STAMP)
	$(BIN)/python bench/explorer.py

# The comparison library (overcomplete) is installed only in its own venv, never in .venv.
bench-compare:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet -r bench/requirements-compare.txt
	.venv-bench/bin/python bench/compare.py

# cytosae TopK vs EleutherAI sparsify's SparseCoder (docs/bench-compare.md), in its own venv; on CPU sparsify's
# Triton decoder cannot run, so its eager embedding-bag path is selected.
bench-sparsify:
	test -x .venv-sparsify/bin/python || $(PYTHON) -m venv .venv-sparsify
	.venv-sparsify/bin/pip install --quiet -r bench/requirements-sparsify.txt
	SPARSIFY_DISABLE_TRITON=1 .venv-sparsify/bin/python bench/compare_sparsify.py

# cytosae TopK vs SAELens's TopKTrainingSAE trained by its own SAETrainer (docs/bench-compare.md), in its own venv;
# BENCH_ARGS passes options through (e.g. BENCH_ARGS="--arch batchtopk --out bench/results/compare-saelens-batchtopk.json").
bench-saelens:
	test -x .venv-saelens/bin/python || $(PYTHON) -m venv .venv-saelens
	.venv-saelens/bin/pip install --quiet -r bench/requirements-saelens.txt
	.venv-saelens/bin/python bench/compare_saelens.py $(BENCH_ARGS)

# Real patients (../shared/data/deepapl): extract, SAE, concepts, patient-level diagnosis vs baselines.
bench-deepapl: $(STAMP)
	$(BIN)/python bench/deepapl.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache test-artifacts
