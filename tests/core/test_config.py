"""Settings precedence: flags > MQCHAT_* environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqchat.cli import _parser, _settings
from mqchat.config import Settings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def test_defaults() -> None:
    settings = Settings.load()
    assert (settings.mqtt.port, settings.mqtt.ws_port, settings.http.port) == (1883, 8083, 8080)
    assert settings.resolved_database_url().startswith("sqlite+aiosqlite:///")
    assert settings.resolved_database_url().endswith("mqchat-data/mqchat.db")


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mqchat.toml"
    config.write_text('data_dir = "/srv/chat"\n[mqtt]\nport = 1900\nws_port = 1901\n[http]\nport = 1902\n')
    monkeypatch.setenv("MQCHAT_MQTT__WS_PORT", "2901")
    monkeypatch.setenv("MQCHAT_HTTP__PORT", "2902")
    args = _parser().parse_args(["serve", "--config", str(config), "--http-port", "3902"])
    settings = _settings(args)
    assert settings.data_dir == Path("/srv/chat")
    assert (settings.mqtt.port, settings.mqtt.ws_port, settings.http.port) == (1900, 2901, 3902)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[mqtt]\nprot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        Settings.load(config)


@pytest.mark.parametrize("name", ["embedded.toml", "postgres.toml"])
def test_example_configs_load(name: str) -> None:
    path = CONFIG_DIR / name
    if not path.exists():
        pytest.fail(f"config/{name} is missing")
    Settings.load(path)
