# The two commands of the README: `make demo` and `make test`. Both build the virtual environment first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit debs bytecode bench fuzz fuzz-endpoints soak cluster study clean

# The install builds the one compiled part (setup.py: the one-frame fast path in C), so its source is a prerequisite.
$(STAMP): pyproject.toml setup.py src/mplslb/switching/_fast.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP) bytecode
	$(BIN)/mplslb demo

# The package's bytecode, written once: the lab and the tests start hundreds of mplslb processes, and where
# PYTHONDONTWRITEBYTECODE is set each would compile every module again (about 0.3 s of CPU a start here).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src

# Debian packages the tests use (tshark reads our packets; nginx, curl and wrk are the stock programs of the
# lab; clang builds the kernel offload's XDP program; netsniff-ng's trafgen and nftables serve the wire
# benchmarks; chromium and its driver run the status page's browser test; bird2 is the BGP speaker of the balancer
# nodes and the ECMP router of the several-node lab); installed only when one is missing.
DEBS := tshark nginx-light curl wrk clang netsniff-ng nftables chromium chromium-driver bird2
debs:
	@missing=""; for tool in tshark nginx curl wrk nsenter clang trafgen nft chromium chromedriver bird birdc; do command -v $$tool >/dev/null 2>&1 || \
	  [ -x /usr/sbin/$$tool ] || missing=yes; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS) util-linux >/dev/null; fi

LINTED := src tests $(wildcard bench)

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers (the reference machine's two cores): the lab tests mostly wait on their processes, the others compute.
# Each test file runs whole on one worker, and the files that load the machine one after another (tests/conftest.py);
# the tests marked `alone` (node changes in the several-node lab, timed against BGP) then run by themselves.
unit: $(STAMP) bytecode
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=15 -m "not alone"
	$(BIN)/pytest -q --durations=5 -m alone

test: $(STAMP) debs lint typecheck unit

# The benchmarks (bench/run.py, one table; figures recorded in docs/benchmarks.md): the lab's packages (debs),
# haproxy (the end-to-end reference) and py-spy (the profiles), each installed only when missing. About 12-15
# minutes on the 2-core reference machine; bench/run.py keeps itself under its --budget (1,080 s by default).
BENCH_DEBS := haproxy
bench: $(STAMP) debs bytecode
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_DEBS) >/dev/null; }
	@[ -x $(BIN)/py-spy ] || $(BIN)/pip install --quiet py-spy
	$(BIN)/python bench/run.py

# The fuzz campaign (bench/fuzz.py): FRAMES hostile frames (10 million by default) through receive, receive_batch,
# receive_block and the XDP program, each checked against the one-frame path, every frame accounted for; SEED
# replays a run. About 46 minutes for 10 million on the (busy) 2-core reference machine; figures in docs/benchmarks.md.
FRAMES ?= 10000000
SEED ?= 1
fuzz: $(STAMP) debs
	$(BIN)/python bench/fuzz.py --frames $(FRAMES) --seed $(SEED)

# The endpoints' campaign (bench/fuzz.py --endpoints): ENDPOINT_FRAMES hostile frames and packets (2 million by
# default) through the kernel programs and the Python endpoint of both roles, compared frame by frame (root, clang);
# SEED replays a run. About 8,000 frames/s on the 2-core reference machine.
ENDPOINT_FRAMES ?= 2000000
fuzz-endpoints: $(STAMP) debs
	$(BIN)/python bench/fuzz.py --endpoints --frames $(ENDPOINT_FRAMES) --seed $(SEED)

# The soak (bench/soak.py): short sessions through the real lab for DURATION seconds (300 by default), the RSS of
# the balancer and of every agent sampled; fails if any grew more than 5 % after the warm-up (the first 20 %).
DURATION ?= 300
soak: $(STAMP) debs bytecode
	$(BIN)/python bench/soak.py --duration $(DURATION)

# The several-node lab's node changes (a node killed, its links cut, a fourth node joining, a node restarted) with
# twenty rate-limited downloads of MB megabytes each (20 by default; `make test` runs them at 2 MB to stay short):
# about 100 s a test on the 2-core reference machine.
MB ?= 20
cluster: $(STAMP) debs bytecode
	MPLSLB_CLUSTER_DOWNLOAD_MB=$(MB) $(BIN)/pytest -q -s tests/e2e/test_cluster_lab.py

# How well does it balance? Simulates every algorithm over a grid of scenarios (about 6 minutes on the 2-core
# reference machine) and writes docs/study.md with its figures in docs/study/.
study: $(STAMP)
	$(BIN)/mplslb study --output docs

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
