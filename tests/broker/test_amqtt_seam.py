"""The contract with amqtt: every name mqchat relies on still exists and takes what we pass.

amqtt ships no types, so a rename would not fail mypy; it fails here, naming the symbol.
``mqchat/broker/amqtt_host.py`` is the only module that may import amqtt.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import socket
from pathlib import Path

import pytest

from mqchat import runner
from mqchat.broker.amqtt_host import RELIED_ON
from mqchat.config import Settings
from mqchat.runner import PortInUse, run_server

PACKAGE = Path(__file__).resolve().parents[2] / "mqchat"


def resolve(name: str) -> object:
    """``a.b.C.d`` -> the object, importing the longest module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(name)


@pytest.mark.parametrize("name", sorted(RELIED_ON))
def test_every_amqtt_name_we_rely_on_exists_with_its_parameters(name: str) -> None:
    try:
        target = resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"amqtt no longer has {name}: {exc}")
    expected = RELIED_ON[name]
    if expected:
        assert callable(target), name
        parameters = [p for p in inspect.signature(target).parameters if p != "self"]
        assert parameters[: len(expected)] == list(expected), f"{name} now takes {parameters}"


def test_amqtt_start_still_creates_listeners_through_the_method_we_override() -> None:
    """If amqtt stopped calling ``_create_server_instance``, our override would be dead code."""
    start_listeners = inspect.getsource(resolve("amqtt.broker.Broker._start_listeners"))  # type: ignore[arg-type]
    assert "self._create_server_instance(" in start_listeners
    assert "self._create_ssl_context(" in start_listeners


def test_only_the_host_module_imports_amqtt() -> None:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "amqtt" or name.startswith("amqtt.") for name in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    # The bench's plain-amqtt peer is amqtt on purpose: it is what we compare against.
    assert sorted(set(importers)) == ["bench/plain_amqtt.py", "broker/amqtt_host.py"]


async def test_the_listeners_amqtt_starts_are_ours(settings: Settings) -> None:
    async with run_server(settings) as server:
        assert server.mqtt_port and server.ws_port
        assert set(server.broker.stats) >= {"connections", "devices", "sessions"}


async def test_a_port_taken_after_the_start_up_check_is_the_same_one_line_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between ``check_ports`` and the bind another process can take the port (tests picking
    free ports side by side did): amqtt wraps the bind's error in its own; the user still gets
    which port and which flag, not a traceback (the CLI prints it and exits with 2)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    taken = settings.model_copy(update={"mqtt": settings.mqtt.model_copy(update={"port": port})})
    monkeypatch.setattr(runner, "check_ports", lambda settings: None)  # it was free at the check
    try:
        with pytest.raises(PortInUse, match=f"port {port} is already in use; choose another with --mqtt-port"):
            async with run_server(taken):
                pass
    finally:
        holder.close()
