# aether-fast: every developer and CI command. `make install && make run`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
URL ?= 127.0.0.1:8000

.PHONY: system-deps install run dev test test-unit test-integration lint build clean fuzz
.PHONY: conformance-deflate
.PHONY: dev-watch dev-debug load

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

system-deps:  ## the system packages the build and the tests need: apt-get installs what is missing (root or sudo), else says what to install
	@PYTHON=$(PYTHON) bash tools/system_deps.sh $(if $(DRY_RUN),--dry-run)

install: $(BIN)/python  ## create .venv, build the Cython extension, install with dev tools
	$(BIN)/python -m pip install -q -e '.[dev]'

build: $(BIN)/python  ## rebuild the extension in place after editing ext/
	$(BIN)/python setup.py -q build_ext --inplace

run:  ## start the server on its embedded defaults (0.0.0.0:8000, metrics on 9090)
	$(BIN)/aether-fast serve

dev:  ## the server with debug logging
	LOG_LEVEL=debug $(BIN)/aether-fast serve

dev-watch:  ## `make dev`, restarted on a change under aether_fast/ or ext/ (ext/ rebuilt first)
	$(BIN)/python tools/dev_watch.py

dev-debug:  ## debug build of ext/ (bounds checks, line tracing) + asyncio debug mode; `make build` undoes
	AETHER_DEBUG_BUILD=1 $(BIN)/python setup.py -q build_ext --inplace
	@echo "dev-debug: aether_fast/_core is now a debug build; 'make build' restores the release build"
	PYTHONASYNCIODEBUG=1 PYTHONDEVMODE=1 LOG_LEVEL=debug $(BIN)/aether-fast serve

test: system-deps  ## system-deps, then every test: unit and integration
	$(BIN)/python -m pytest -q --durations=20

test-unit:
	$(BIN)/python -m pytest -q tests/unit

test-integration:
	$(BIN)/python -m pytest -q tests/integration

load:  ## bounded load run (200 connections, 10 s) on the server at $(URL); set JWT_SECRET as it has
	$(BIN)/python -m tools.load --url $(URL) $(LOAD_ARGS)

lint:  ## ruff, mypy --strict on aether_fast/, tools/, tests/ and bench/, stubtest of _core.pyi, cython-lint on ext/, hadolint
	$(BIN)/ruff check aether_fast tests bench tools
	$(BIN)/ruff format --check aether_fast tests tools bench
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest aether_fast._core --allowlist tools/stubtest_allowlist.txt
	$(BIN)/hadolint Dockerfile
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cython-lint ext

clean:
	rm -rf build aether_fast/*.so ext/*.c *.egg-info

conformance-deflate:  ## every kosoku compression case (12.*, 13.*: 216, ~7 min); CI runs a subset
	AETHER_KOSOKU_FULL=1 $(BIN)/python -m pytest -q tests/conformance/test_autobahn.py -k compression

fuzz:  ## a longer fuzzing campaign of the message decoder and the HTTP front
	AETHER_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/fuzz

# -- benchmarks: bench/ (docs/performance.md) ---------------------------------------------
.PHONY: bench bench-quick bench-smoke bench-micro bench-deps bench-workers bench-compare

# the packages of pyproject's `bench` extra, read from pyproject.toml
BENCH_PKGS = $(shell $(BIN)/python -c "import tomllib; print(' '.join(repr(p) for p in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))")

bench-deps: $(BIN)/python  ## the peers' packages (bench extra), Node's ws (if npm exists), the C load generator
	$(BIN)/python -m pip install -q $(BENCH_PKGS)
	@if command -v npm >/dev/null 2>&1; then \
		npm install --prefix bench/peers --no-audit --no-fund --loglevel=error \
		|| echo "bench: npm install failed: the node-ws peer will be reported unavailable"; \
	else echo "bench: npm not found: the node-ws peer will be reported unavailable"; fi
	$(MAKE) -s -C bench

bench: bench-deps  ## every benchmark, 3 runs: bench/results/<time>.json, latest.md, *.png
	$(BIN)/python bench/run.py

bench-quick: bench-deps  ## the same scenarios, 1 run, shorter (< 3 minutes)
	$(BIN)/python bench/run.py --quick

bench-workers: bench-deps  ## WORKERS=2 against WORKERS=1, both through a Redis of its own
	$(BIN)/python bench/workers.py

bench-compare: bench-deps  ## before/after in one run: REV=<commit> against the working tree, alternating
	$(BIN)/python bench/before_after.py $(REV)

bench-smoke: bench-deps  ## every scenario tiny, for CI: it must work (no speed assertions)
	$(BIN)/python bench/run.py --smoke
	$(BIN)/python bench/workers.py --smoke

bench-micro: $(BIN)/python  ## pytest-benchmark micro benchmarks of the compiled hot path
	$(BIN)/python -m pytest bench/micro

# -- soak: well-behaved clients and every attack at once (docs/security.md) -----------------
.PHONY: soak soak-short

soak: $(BIN)/python  ## 1000 clients on 50 channels, 30 s calm then 30 s under every attack; SOAK_ARGS=...
	$(BIN)/python -m tools.soak $(SOAK_ARGS)

soak-short: $(BIN)/python  ## the CI form of `make soak` (200 clients, 10 + 10 s)
	$(BIN)/python -m tools.soak --short $(SOAK_ARGS)
