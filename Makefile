# The two commands of the README: `make demo` and `make test`. Both build the virtual environment first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit debs clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mplslb demo

# Debian packages the tests use (tshark reads our packets; nginx, curl and wrk are the stock programs of the
# lab); installed only when one is missing.
DEBS := tshark nginx-light curl wrk
debs:
	@missing=""; for tool in tshark nginx curl wrk nsenter; do command -v $$tool >/dev/null 2>&1 || \
	  [ -x /usr/sbin/$$tool ] || missing=yes; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) util-linux >/dev/null; fi

LINTED := src tests $(wildcard bench)

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: $(STAMP) debs lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
