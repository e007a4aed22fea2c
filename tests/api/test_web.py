"""The browser page's files and its client config, over HTTP (the page itself: tests/clients/test_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqchat.api.schemas import ClientConfig
from mqchat.config import Settings
from mqchat.runner import RunningServer
from tests.support.accounts import http_client


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"


async def test_the_page_and_its_vendored_files_are_served(server: RunningServer) -> None:
    async with http_client(server) as http:
        index = await http.get("/")
        script = await http.get("/static/app.js")
        mqtt_js = await http.get("/static/vendor/mqtt.min.js")
        licence = await http.get("/static/vendor/MQTT.js-LICENSE.md")
        missing = await http.get("/static/nope.js")
        schema = (await http.get("/openapi.json")).json()
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'src="/static/vendor/mqtt.min.js"' in index.text
    assert script.status_code == 200 and "mqtt.connect" in script.text
    assert mqtt_js.status_code == 200 and len(mqtt_js.content) > 100_000
    assert "MIT License" in licence.text
    assert missing.status_code == 404
    assert "/" not in schema["paths"]  # the page is not part of the API


async def test_client_config_names_the_websocket_port_the_broker_bound(server: RunningServer) -> None:
    async with http_client(server) as http:
        config = await http.get("/v1/client-config")
    assert config.status_code == 200
    # The settings say port 0: the page must get the port the system chose.
    assert server.ws_port
    assert config.json() == {
        "ws_port": server.ws_port,
        "wss_port": None,
        "ws_path": "/mqtt",
        "recall_window_seconds": 120.0,
        "max_file_bytes": 26214400,
    }


def test_client_config_defaults_to_the_configured_ports(tmp_path: Path) -> None:
    plain = Settings.load(None, data_dir=tmp_path, mqtt={"ws_port": 9001})
    assert ClientConfig.of(plain) == ClientConfig(ws_port=9001, wss_port=None)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls_only = Settings.load(
        None, data_dir=tmp_path, tls={"certfile": cert, "keyfile": key, "wss_port": 9443, "plain_listeners": False}
    )
    assert ClientConfig.of(tls_only) == ClientConfig(ws_port=None, wss_port=9443)


def test_behind_a_load_balancer_the_page_is_told_the_balancers_websocket_port(tmp_path: Path) -> None:
    settings = Settings.load(None, data_dir=tmp_path, mqtt={"ws_port": 0, "public_ws_port": 12002})
    # The node listens on whatever it bound; browsers go through the balancer.
    assert ClientConfig.advertised(settings, ws_port=41234, wss_port=None) == ClientConfig(ws_port=12002, wss_port=None)
    # A listener that does not run is not advertised, whatever the setting says.
    assert ClientConfig.advertised(settings, ws_port=None, wss_port=None) == ClientConfig(ws_port=None, wss_port=None)
