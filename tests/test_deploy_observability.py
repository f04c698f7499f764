"""deploy/grafana/ and compose.yaml's `observability` profile, without a Docker engine: the
dashboard's queries name only metrics the server exposes (tests/metric_names.py) and are
PromQL Prometheus accepts (promtool, when installed); the profile's services mount files
that exist, and each address one service gives another matches the port that other
listens on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_names import KNOWN, KNOWN_LABELS
from tests.promql import for_promtool, label_names, metric_names

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "creditline.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COLLECTOR = ROOT / "deploy" / "otel-collector.yaml"

# the panels issue 19 asks for, by a word of each title
EXPECTED_PANELS = ("Requests/s", "latency p50 / p99", "In flight", "5012", "Redis script",
                   "Redis up", "hub", "Supervision", "CDR backlog", "charged", "Accounts")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel["targets"]]


def test_the_dashboard_has_the_panels_on_a_prometheus_datasource_variable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    titles = [panel["title"] for panel in board["panels"]]
    for word in EXPECTED_PANELS:
        assert any(word in title for title in titles), (word, titles)
    assert len({panel["id"] for panel in board["panels"]}) == len(titles)
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]


def test_every_query_names_only_metrics_and_labels_the_server_exposes() -> None:
    for title, expr in queries():
        assert metric_names(expr), (title, expr)
        assert metric_names(expr) <= KNOWN, (title, metric_names(expr) - KNOWN)
        assert label_names(expr) <= KNOWN_LABELS, (title, label_names(expr) - KNOWN_LABELS)


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus)")
def test_every_query_is_promql_that_prometheus_parses(tmp_path: Path) -> None:
    # promtool has no query parser of its own offline; a recording rule per query goes
    # through Prometheus's parser (Grafana's $__rate_interval filled in as Grafana does)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{number}", "expr": for_promtool(expr)}
        for number, (_title, expr) in enumerate(queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    finished = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_the_profiles_prometheus() -> None:
    datasource = _yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    # the dashboard variable's default names this uid
    assert datasource["uid"] == dashboard()["templating"]["list"][0]["current"]["value"]
    assert datasource["url"] == "http://prometheus:9090"
    provider = _yaml(PROVISIONING / "dashboards" / "creditline.yml")["providers"][0]
    grafana = _yaml(ROOT / "compose.yaml")["services"]["grafana"]
    assert (f"./deploy/grafana/creditline.json:{provider['options']['path']}/creditline.json:ro"
            in grafana["volumes"])


def _bind_sources(service: dict[str, Any]) -> list[str]:
    return [volume.split(":")[0] for volume in service.get("volumes", [])
            if volume.startswith("./")]


def _published(service: dict[str, Any]) -> set[int]:
    return {int(port.rsplit(":", 1)[-1]) for port in service.get("ports", [])}


def test_the_observability_profile_is_consistent() -> None:
    compose = _yaml(ROOT / "compose.yaml")
    services = compose["services"]
    profiled = {name for name, service in services.items()
                if "observability" in service.get("profiles", [])}
    assert profiled == {"prometheus", "grafana"}
    assert "profiles" not in services["otel-collector"]  # the server depends on it
    for name, service in services.items():
        for source in _bind_sources(service):
            assert (ROOT / source).exists(), (name, source)
        for volume in service.get("volumes", []):
            named = volume.split(":")[0]
            assert named.startswith("./") or named in compose["volumes"], (name, volume)
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
            # a service outside the profile must not need one inside it
            assert name in profiled or dependency not in profiled, (name, dependency)
    # Prometheus's targets are the services' listening ports
    scrape = {job["job_name"]: job["static_configs"][0]["targets"][0]
              for job in _yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    metrics_address = services["creditline"]["environment"]["CREDITLINE_METRICS_LISTEN_ADDRESS"]
    assert metrics_address.startswith("0.0.0.0:")  # reachable from the Prometheus container
    assert scrape["creditline"] == "creditline:" + metrics_address.rsplit(":", 1)[1]
    collector = _yaml(COLLECTOR)
    assert scrape["otel-collector"] == "otel-collector:" + (
        collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1])
    assert scrape["otel-collector-internal"] == "otel-collector:" + (
        collector["service"]["telemetry"]["metrics"]["address"].rsplit(":", 1)[1])
    assert 9090 in _published(services["prometheus"]) and 3000 in _published(services["grafana"])
    assert all(port.startswith("127.0.0.1:") for name in profiled
               for port in services[name]["ports"])  # loopback only, as the metrics port
    prometheus_mount = next(v for v in services["prometheus"]["volumes"]
                            if v.startswith("./deploy/prometheus:"))
    assert prometheus_mount.split(":")[1] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_the_collector_pipelines_use_only_declared_components() -> None:
    collector = _yaml(COLLECTOR)
    declared = {kind: set(collector.get(kind) or {}) for kind in
                ("receivers", "processors", "exporters", "connectors")}
    used: set[str] = set()
    for name, pipeline in collector["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in declared[kind] | declared["connectors"], (name, component)
                used.add(component)
    # nothing declared and left out of the pipelines (a component meant to be on that is not)
    assert set().union(*declared.values()) <= used
    # a connector must end one pipeline and start another, or the collector refuses it
    for connector in declared["connectors"]:
        pipelines = collector["service"]["pipelines"].values()
        assert any(connector in p.get("exporters", []) for p in pipelines), connector
        assert any(connector in p.get("receivers", []) for p in pipelines), connector
    # the server's own metrics reach Prometheus by its scrape only (no duplicate series)
    assert "prometheus" not in collector["service"]["pipelines"]["metrics"]["exporters"]
