# aether-fast: every developer and CI command. `make install && make run`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run dev test test-unit test-integration lint build clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python  ## create .venv, build the Cython extension, install with dev tools
	$(BIN)/python -m pip install -q -e '.[dev]'

build: $(BIN)/python  ## rebuild the extension in place after editing ext/
	$(BIN)/python setup.py -q build_ext --inplace

run:  ## start the server on its embedded defaults (0.0.0.0:8000, metrics on 9090)
	$(BIN)/aether-fast serve

dev:  ## the server with debug logging
	LOG_LEVEL=debug $(BIN)/aether-fast serve

test:  ## every test: unit and integration
	$(BIN)/python -m pytest -q

test-unit:
	$(BIN)/python -m pytest -q tests/unit

test-integration:
	$(BIN)/python -m pytest -q tests/integration

lint:  ## ruff, mypy --strict on aether_fast/, cython-lint on ext/
	$(BIN)/ruff check aether_fast tests bench
	$(BIN)/ruff format --check aether_fast tests
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cython-lint ext

clean:
	rm -rf build aether_fast/*.so ext/*.c *.egg-info

fuzz:  ## a longer fuzzing campaign of the message decoder and the HTTP front
	AETHER_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/fuzz
