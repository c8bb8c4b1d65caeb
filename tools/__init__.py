"""Developer tools run from the repository's root: `python -m tools.load`, `python -m tools.soak`
(`make load`, `make soak`), `tools/dev_watch.py` (`make dev-watch`); tools/common.py holds what
they and tests/conftest.py share."""
