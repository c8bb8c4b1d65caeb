"""docs/operations.md stays true to the code: the configuration table is describe(), every
subcommand and make target it names exists, and each production checklist item is answered."""

from __future__ import annotations

import re

from aether_fast.cli import _parser
from aether_fast.config import SETTINGS, describe
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "operations.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def section(title: str) -> str:
    start = DOC.index(title)
    rest = DOC[start + len(title) :]
    nxt = re.search(r"^## ", rest, re.M)
    return rest[: nxt.start()] if nxt else rest


def test_configuration_table_is_every_setting_with_default_and_meaning() -> None:
    table = section("## 3. Configuration")
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| (.*?) \| (.*) \|$", table, re.M)
    documented = [env for env, _, _ in rows]
    assert documented == [s.env for s in SETTINGS], "order and names as config.SETTINGS"
    for (env, default, meaning), s, (_, want_default, want_meaning) in zip(
        rows, SETTINGS, describe(), strict=True
    ):
        if s.default_text is None:
            assert default == f"`{want_default}`", env
        else:
            assert default == (want_default or "unset"), env
        assert meaning.replace("&#124;", "|") == want_meaning, env


def test_every_subcommand_is_documented() -> None:
    commands = section("## 2. Command line")
    sub = next(a for a in _parser()._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[arg-type]
    assert {"serve", "token", "check-config", "health", "backup", "restore"} <= names
    for name in names:
        assert f"`aether-fast {name}" in commands, name


def test_make_targets_named_in_the_docs_exist() -> None:
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", MAKEFILE, re.M))
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", DOC))
    assert {"dev", "dev-watch", "dev-debug", "test-integration", "load", "bench"} <= named
    assert named <= targets, named - targets


def test_production_checklist_answers_each_item() -> None:
    checklist = section("## 17. Production checklist")
    items = (
        "Configure SSL certificates",
        "Set up load balancer",
        "Configure monitoring",
        "Set up logging",
        "Configure backups",
        "Test recovery procedures",
    )
    for n, item in enumerate(items, 1):
        row = re.search(rf"^\| {n}\. {item} \| (.+) \|$", checklist, re.M)
        assert row and len(row.group(1)) > 40, item


def test_documented_files_exist() -> None:
    for path in re.findall(r"`((?:deploy|tools|tests/\w+)/[\w./-]+\.(?:yml|json|py))`", DOC):
        assert (ROOT / path).is_file(), path
