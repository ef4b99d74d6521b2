# Everything a fresh machine needs is installed by these targets: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-run

.PHONY: lock demo test test-fast browser bench bench-extract bench-sae bench-explorer bench-compare bench-deepapl clean

# The venv is rebuilt when pyproject.toml or constraints.txt changes; constraints.txt pins every version exactly. dinov2 (Meta's reference code, test-only) is installed
# without its dependencies because it pins torch 2.0 and CUDA-only packages we neither need nor can use.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps dinov2==0.0.1.dev2
	touch $(STAMP)

# requirements-lock.txt: every package of the venv at an exact version with hashes (pip-compile in a throwaway venv).
lock:
	PYTHON=$(PYTHON) scripts/lock.sh

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

# Real patients (../shared/data/deepapl): extract, SAE, concepts, patient-level diagnosis vs baselines.
bench-deepapl: $(STAMP)
	$(BIN)/python bench/deepapl.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache test-artifacts
