"""deploy/: the Prometheus scrape config, the alert rules and the Grafana dashboard, checked with
promtool (Debian's `prometheus` package; .ci/run installs it). That every metric they name
exists in a real scrape is checked in tests/integration/test_operations.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS,
    alert_rules,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    load_yaml,
    metric_names,
    referenced_metrics,
)

PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL, "promtool missing: apt-get install prometheus (.ci/run does)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    out = promtool("check", "config", str(PROMETHEUS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
    config = load_yaml(PROMETHEUS)
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "aether-fast"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(":9090") for t in targets), targets


def test_alert_rules_are_valid() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_cover_the_operations_issue() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    # error rate, slow-reader disconnects, Redis degraded, connection saturation
    wanted = {
        "AetherHighErrorRate": "aether_errors_total",
        "AetherSlowReaderDisconnects": "aether_slow_reader_disconnects_total",
        "AetherDegraded": "aether_up",
        "AetherConnectionSaturation": "aether_connections_limit",
    }
    for alert, metric in wanted.items():
        assert alert in rules, f"no {alert} rule"
        assert metric in metric_names(rules[alert]["expr"]), (alert, rules[alert]["expr"])
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    out = promtool("test", "rules", str(ALERTS_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = load_yaml(ALERTS_TEST)["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == {r["alert"] for r in alert_rules()}


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The checks above can fail: a typo in an expression is caught."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}
        )
    )
    assert promtool("check", "rules", str(bad)).returncode != 0


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "node"} <= names
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 8
    for panel in graphs:
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule for
    promtool to parse."""
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        filled = (
            expr.replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$node", ".*")
            .replace("${node}", ".*")
        )
        assert "$" not in filled, f"unknown variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    assert len(rules) >= 10
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_shows_what_the_alerts_watch() -> None:
    uses = referenced_metrics()
    in_alerts = {m for m, where in uses.items() if any(w.startswith("alerts") for w in where)}
    on_dashboard = {m for m, where in uses.items() if any(w.startswith("dashboard") for w in where)}
    assert in_alerts <= on_dashboard, in_alerts - on_dashboard


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum(rate(aether_errors_total{code="INTERNAL_ERROR"}[5m]))', {"aether_errors_total"}),
        ('aether_up{worker="aether_fake"} == 0', {"aether_up"}),
        ("a / aether_connections_limit > 0.8", {"aether_connections_limit"}),
    ],
)
def test_metric_names_are_read_from_expressions(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
