"""picows is pinned because the server uses some of its internals: docs/architecture.md lists
them ("picows internals we rely on"), each with the test that fails if it changes. Here: the
installed picows is the pinned one (the extension is compiled against its struct layout), both
pins agree, and every test that list names exists."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## picows internals we rely on"


def _pins() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = project["build-system"]["requires"] + project["project"]["dependencies"]
    return [r.split("==", 1)[1] for r in reqs if re.match(r"picows\s*==", r)]


def _section() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert SECTION in text, f"docs/architecture.md has no section {SECTION!r}"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def test_installed_picows_is_the_pinned_one() -> None:
    pins = _pins()
    assert len(pins) == 2 and len(set(pins)) == 1, pins  # build-system and dependencies
    assert version("picows") == pins[0]
    assert f"picows=={pins[0]}" in _section()


def test_every_test_named_for_an_internal_exists() -> None:
    rows = [line for line in _section().splitlines() if line.startswith("| ")][1:]  # no header
    assert len(rows) >= 10, rows
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert named, f"no test named for: {row}"
        for path, name in named:
            tree = ast.parse((ROOT / path).read_text())
            tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in tests, f"{path}::{name} (docs/architecture.md) does not exist"
