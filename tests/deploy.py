"""The monitoring files in deploy/ as the tests see them: every PromQL expression they hold,
and the aether_* metric names those expressions use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"

# a metric name in PromQL: not inside a label matcher's quotes, not followed by `=` or `(`
# (label names and functions); every aether metric starts with `aether_`
_METRIC = re.compile(r"\baether_[a-zA-Z0-9_:]+\b")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """The aether_* metric names an expression selects (label values in quotes excluded)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def referenced_metrics() -> dict[str, set[str]]:
    """metric name -> where it is used ("alerts.yml: AetherDegraded", "dashboard: Errors")."""
    uses: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            uses.setdefault(name, set()).add(f"alerts.yml: {rule['alert']}")
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                uses.setdefault(name, set()).add(f"dashboard: {panel['title']}")
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            uses.setdefault(name, set()).add("dashboard: variables")
    return uses


def scraped_names(exposition: str) -> set[str]:
    """Sample names in a Prometheus text exposition."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
