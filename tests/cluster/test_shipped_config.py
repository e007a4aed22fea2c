"""The files in config/cluster/ are what users run: HAProxy accepts haproxy.cfg as shipped and
with its ports moved by the environment, and mqchat's loader accepts every node's toml."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mqchat.config import Settings
from tests.support.haproxy import SHIPPED_CONFIG, haproxy_binary
from tests.support.processes import REPO

CLUSTER = REPO / "config" / "cluster"


@pytest.mark.parametrize("env", [{}, {"MQCHAT_LB_MQTT_PORT": "31001", "MQCHAT_N2_HTTP_PORT": "31203"}])
def test_haproxy_accepts_the_shipped_config(env: dict[str, str]) -> None:
    checked = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(SHIPPED_CONFIG)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr


def test_the_node_configs_load_and_match_the_haproxy_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("MQCHAT_")]:
        monkeypatch.delenv(name)  # the files alone, not this machine's environment
    text = SHIPPED_CONFIG.read_text()
    secrets = set()
    for k in (1, 2, 3):
        settings = Settings.load(CLUSTER / f"n{k}.toml")
        assert settings.node_id == f"n{k}"
        assert (settings.mqtt.port, settings.mqtt.ws_port, settings.http.port) == (
            12001 + 100 * k,
            12002 + 100 * k,
            12003 + 100 * k,
        )
        for variable, port in (
            ("MQTT", settings.mqtt.port),
            ("WS", settings.mqtt.ws_port),
            ("HTTP", settings.http.port),
        ):
            assert f"presetenv MQCHAT_N{k}_{variable}_PORT {port}\n" in text
        assert settings.redis_url and settings.database_url and settings.database_url.startswith("postgresql")
        assert settings.data_dir == Path(f"mqchat-data/cluster/n{k}")
        secrets.add(settings.auth.secret)
    assert len(secrets) == 1, "every node must share the token key"


def test_run_local_is_valid_bash() -> None:
    script = CLUSTER / "run-local.sh"
    assert os.access(script, os.X_OK)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
