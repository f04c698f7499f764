"""deploy/prometheus/: the alert rules and the Prometheus configuration, checked by
Prometheus's own promtool (Debian's prometheus package; .ci/run installs it): the rules
load, the configuration loads, and the rules' unit tests (alerts_test.yml: series that
fire each alert and series that must not) pass. Without promtool only those three skip;
the checks of what each rule carries and names run everywhere."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_names import KNOWN, KNOWN_LABELS
from tests.promql import label_names, metric_names

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus; "
                             ".ci/run installs it)")

# what the issue asks the rules to watch: each must be there
EXPECTED_ALERTS = {"CreditlineUnableToComplyRate", "CreditlineLatencyP99High",
                   "CreditlineNotificationHubLag", "CreditlineSupervisionClosuresSurge",
                   "CreditlineRedisDown", "CreditlineCdrBacklogGrowing", "CreditlineDown"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> None:
    assert PROMTOOL is not None
    finished = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=120, check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_the_alert_rules_load_in_promtool() -> None:
    promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_the_prometheus_configuration_loads_in_promtool() -> None:
    # also loads the rule files the configuration names (alerts.yml)
    promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


@needs_promtool
def test_the_alert_rules_unit_tests_pass_in_promtool() -> None:
    promtool("test", "rules", str(ALERTS_TEST))


def test_each_alert_says_how_long_how_bad_what_it_means_and_what_to_do() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule.get("for"), rule["alert"]  # no alert pages on a single evaluation
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        # the description says what to look at, and where the runbook is
        assert "Operating Creditline" in rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    fired, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == EXPECTED_ALERTS and quiet == EXPECTED_ALERTS, (fired, quiet)


def test_the_rules_name_only_metrics_and_labels_the_server_exposes() -> None:
    """Against tests/metric_names.py, which tests/test_operator_metrics.py holds to a live
    scrape: a misspelt name would make an alert that never fires, and promtool cannot
    tell."""
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= KNOWN, (rule["alert"],
                                                     metric_names(rule["expr"]) - KNOWN)
        assert label_names(rule["expr"]) <= KNOWN_LABELS, (
            rule["alert"], label_names(rule["expr"]) - KNOWN_LABELS)


def test_the_name_extraction_tells_metrics_from_functions_labels_and_durations() -> None:
    # the helper the two tests above and the dashboard's rely on
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(rpc_server_call_duration_'
            'seconds_bucket{rpc_service="a.b"}[5m]))) > 0.05 and on (job) up offset 1d '
            '> 1e3 or deriv(max by (job) (creditline_cdr_backlog)[15m:1m]) > 0')
    assert metric_names(expr) == {"rpc_server_call_duration_seconds_bucket", "up",
                                  "creditline_cdr_backlog"}
    assert label_names(expr) == {"job", "le", "rpc_service"}
