"""The Node's inbound budgets (a real Node, Hub, broker and store; sessions not connected):
one per user or anonymous peer address, shared by its sessions, kept after the last close
until full again, then forgotten by the timer's sweep."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aether_fast._core import Budget, Session
from aether_fast.auth import Claims
from aether_fast.node import Node
from tests.unit.support import memory_worker

WINDOW = 0.3


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with memory_worker(tmp_path, RATE_LIMIT_MESSAGES="3", RATE_LIMIT_WINDOW_S=str(WINDOW)) as w:
        yield w.wired().node


def _open(node: Node, user: str | None, client_id: str, peer: str = "10.0.0.1") -> Session:
    claims = Claims(user, 4e9, False, None) if user is not None else None
    s = Session(node.hub, client_id, claims, peer)
    node.on_open(s)
    return s


def test_budget_per_user_and_per_anonymous_address(node: Node) -> None:
    a1, a2 = _open(node, "alice", "a1"), _open(node, "alice", "a2")
    anon1, anon2 = _open(node, None, "x1"), _open(node, None, "x2")
    other = _open(node, None, "y", peer="10.0.0.2")
    assert isinstance(a1.budget, Budget) and a1.budget is a2.budget
    assert anon1.budget is anon2.budget and anon1.budget is not a1.budget
    assert other.budget is not anon1.budget


def test_budget_outlives_its_connections_until_refilled(node: Node) -> None:
    s = _open(node, "alice", "a1")
    budget = s.budget
    assert budget is not None
    assert [budget.try_take() == 0.0 for _ in range(4)] == [True, True, True, False]
    node.on_close(s)
    node._sweep_budgets()
    again = _open(node, "alice", "a2")  # reconnecting: the same, still empty, budget
    assert again.budget is budget and budget.tokens < 1.0
    node.on_close(again)
    anon = _open(node, None, "x1")
    node.on_close(anon)  # never used: full, forgotten at its first sweep after the window
    time.sleep(WINDOW + 0.05)
    node._sweep_budgets()
    assert _open(node, "alice", "a3").budget is not budget  # refilled, so forgotten
    assert node._budgets.keys() == {"u:alice"}


def test_no_budget_without_a_limit(tmp_path: Path) -> None:
    with memory_worker(tmp_path, RATE_LIMIT_MESSAGES="0") as w:
        assert _open(w.wired().node, "alice", "a1").budget is None
