"""config/monitoring/: the Grafana dashboard and the alert rules name only metrics a running
server exports, and the rules parse and fire as their unit tests say (promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mqchat.config import Settings
from mqchat.runner import run_server
from tests.support.services import REQUIRE_SERVICES

MONITORING = Path(__file__).parents[2] / "config" / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
NAME = re.compile(r"\b((?:mqchat|process|python)_[a-z0-9_]+)\b")
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def dashboard_queries() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }


def rule_queries() -> dict[str, list[str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: [rule["expr"]] for group in groups for rule in group["rules"]}


def exported_sample_names(text: str) -> set[str]:
    """What the server declares, with the sample names each family has (a labelled family
    is declared before its first child exists)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


async def test_the_dashboard_and_the_rules_name_only_exported_metrics(tmp_path: Path) -> None:
    queries = {f"panel {k!r}": v for k, v in dashboard_queries().items()}
    queries |= {f"alert {k}": v for k, v in rule_queries().items()}
    named = {where: {name for query in exprs for name in NAME.findall(query)} for where, exprs in queries.items()}
    prometheus_own = {where for where, exprs in queries.items() if any("up{" in q for q in exprs)}
    assert not [where for where, names in named.items() if not names and where not in prometheus_own]
    settings = Settings.load(
        None,
        data_dir=tmp_path / "data",
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        metrics={"port": 0},
    )
    async with run_server(settings) as server, httpx.AsyncClient() as http:
        exported = exported_sample_names((await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics")).text)
    missing = {where: sorted(names - exported) for where, names in named.items() if names - exported}
    assert not missing, f"named but not exported: {missing}"
    # What the seed asks to alert on is there.
    alerts = set(rule_queries())
    assert {"MqchatSendLatencyHigh", "MqchatMessagesUnpublished", "MqchatDatabaseDown"} <= alerts
    assert {"MqchatSendQueueNearlyFull", "MqchatSlowReaderDisconnects"} <= alerts


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not installed (apt-get install prometheus); .ci/run installs it"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def test_the_rules_parse() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in result.stdout


def test_the_rules_fire_as_their_unit_tests_say() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60, cwd=MONITORING
    )
    assert result.returncode == 0, result.stdout + result.stderr
