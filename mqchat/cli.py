"""``mqchat serve | user add | token | db upgrade | db current | bench``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mqchat import __version__, logs
from mqchat.bench import command as bench_command
from mqchat.bridge.composition import build_services
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.storage.schema import SchemaError
from mqchat.clients.terminal import add_chat_arguments, run_chat
from mqchat.config import Settings
from mqchat.core.errors import ChatError
from mqchat.runner import PortInUse, RunningServer, run_server

log = logging.getLogger("mqchat.serve")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (see config/)")
    parser.add_argument("--data-dir", type=Path, help="where the SQLite file and the signing secret live")
    parser.add_argument(
        "--database-url", help="e.g. postgresql+asyncpg://user@host/db (default: SQLite in the data dir)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqchat", description="Instant-messaging backend on MQTT.")
    parser.add_argument("--version", action="version", version=f"mqchat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the broker, the bridge and the HTTP API")
    _common(serve)
    serve.add_argument("--host", help="interface to listen on (default 0.0.0.0)")
    serve.add_argument("--mqtt-port", type=int, help="MQTT over TCP (default 1883)")
    serve.add_argument("--ws-port", type=int, help="MQTT over WebSocket (default 8083)")
    serve.add_argument("--http-port", type=int, help="HTTP API (default 8080)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING ... (default INFO)")
    serve.add_argument("--log-format", choices=("text", "json"), help="text or JSON lines (default text)")

    user = commands.add_parser("user", help="manage accounts")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser("add", help="create a user")
    _common(add)
    add.add_argument("user_id")
    add.add_argument("--password", help="prompted for when omitted")

    token = commands.add_parser("token", help="print an access token for a user (for scripts and mosquitto_sub)")
    _common(token)
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, help="lifetime in seconds (default: auth.token_ttl_seconds)")
    token.add_argument("--device", help="scope the token to this device id (default: any device of the user)")
    db = commands.add_parser("db", help="the database schema (migrations)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    _common(db_commands.add_parser("upgrade", help="apply the pending schema migrations (under a database lock)"))
    _common(db_commands.add_parser("current", help="print the schema revision of the database"))
    bench_command.add_parser(commands)

    chat = commands.add_parser("chat", help="chat in the terminal, as a client of a running server")
    add_chat_arguments(chat)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Flags win over the environment and the config file, key by key, and are validated alike."""
    overrides: dict[str, Any] = {}
    for key in ("data_dir", "database_url", "log_level", "log_format"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    mqtt: dict[str, Any] = {}
    http: dict[str, Any] = {}
    if getattr(args, "host", None):
        mqtt["host"] = http["host"] = args.host
    for flag, section, key in (("mqtt_port", mqtt, "port"), ("ws_port", mqtt, "ws_port"), ("http_port", http, "port")):
        if getattr(args, flag, None) is not None:
            section[key] = getattr(args, flag)
    if mqtt:
        overrides["mqtt"] = mqtt
    if http:
        overrides["http"] = http
    if args.config is not None and not args.config.is_file():
        raise ConfigError(f"config file {args.config} does not exist")
    try:
        return Settings.load(args.config, **overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from None


class ConfigError(Exception):
    """A setting from a flag, the environment or the config file is wrong."""


async def _serve(settings: Settings) -> None:
    open_files = _raise_open_file_limit()  # before the listeners: the HTTP cap is a quarter of it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_server(settings) as server:
        _tune_gc()
        log.log(*open_files)
        print(
            f"mqchat {__version__}: {_listening(settings, server)} (data in {settings.data_dir}). Ctrl-C stops.",
            flush=True,
        )
        await stop.wait()
        print("shutting down...", flush=True)


def _raise_open_file_limit() -> tuple[int, str]:
    """Soft RLIMIT_NOFILE up to the hard limit: every connection is a descriptor, and the
    usual soft limit of 1,024 is far below the connections a node is meant to hold.

    Returns the log level and line, logged once the server is up (a port in use must stay
    the only line of a failed start)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return logging.DEBUG, "open-file limit: not available on this platform"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (soft, hard):
        return logging.INFO, f"open-file limit: soft {soft}, hard {hard} (unlimited is not raised)"
    if soft >= hard:
        return logging.INFO, f"open-file limit: {soft} (the hard limit)"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        return logging.WARNING, f"open-file limit: {soft}; could not raise it to the hard limit {hard}: {exc}"
    return logging.INFO, f"open-file limit: {hard} (raised from {soft}, the hard limit)"


def _tune_gc() -> None:
    """Fewer, cheaper cycle collections for a server process.

    With 1,000 devices at 1,000 msgs/s, CPython's default thresholds (700, 10, 10) ran a
    young collection every few hundred allocations and full collections that walked every
    connection's objects: pauses of 250-400 ms that were the whole p99 (332 ms; 31 ms with
    these thresholds, docs/performance.md). What exists after start-up (modules, ORM
    metadata, settings) lives as long as the process: frozen, no collection walks it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop if chosen or (``auto``) installed; None means asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop = uvloop, but uvloop is not installed (pip install 'mqchat[fast]')") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _listening(settings: Settings, server: RunningServer) -> str:
    mqtt, http = settings.mqtt.host, settings.http.host
    listeners = [
        ("MQTT", mqtt, server.mqtt_port, ""),
        ("MQTT-over-WebSocket", mqtt, server.ws_port, "/mqtt"),
        ("HTTP", http, server.http_port, ""),
        ("MQTT over TLS", mqtt, server.mqtts_port, ""),
        ("MQTT-over-WebSocket over TLS", mqtt, server.wss_port, "/mqtt"),
        ("HTTPS", http, server.https_port, ""),
        ("metrics", settings.metrics.host, server.metrics_port, "/metrics"),
    ]
    return ", ".join(f"{what} on {host}:{port}{path}" for what, host, port, path in listeners if port is not None)


async def _add_user(settings: Settings, user_id: str, password: str) -> None:
    async with build_services(settings) as services:
        await services.accounts.register(user_id, password)


async def _token(settings: Settings, user_id: str, ttl: int | None, device_id: str | None = None) -> str:
    async with build_services(settings) as services:
        if await services.store.get_password_hash(user_id) is None:
            raise ChatError(f"no such user {user_id!r}")
        return services.tokens.issue(user_id, ttl, device_id=device_id)


async def _db(settings: Settings, command: str) -> str:
    settings.prepare_data_dir()
    store = SqlStore.from_url(settings.resolved_database_url())
    try:
        if command == "upgrade":
            found = await store.migrate()
            if found.up_to_date:
                return f"the database is at {found.head} (head): nothing to do"
            return f"upgraded the database from {found.current or 'empty'} to {found.head} (head)"
        found = await store.schema_state()
        if found.up_to_date:
            return f"{found.head} (head)"
        current = {None: "none (empty database)", "legacy": "legacy (tables from before migrations)"}.get(
            found.current, found.current
        )
        return f"{current}; this mqchat's head is {found.head}: run `mqchat db upgrade`"
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return bench_command.main(args, sys.argv[2:] if argv is None else argv[1:])
    if args.command == "chat":  # a client: no server settings
        return run_chat(args)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    # Text or JSON lines, with the node id; libraries that would log payloads stay at WARNING.
    logs.configure(settings.log_level, settings.log_format, settings.resolved_node_id())
    try:
        if args.command == "serve":
            with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
                runner.run(_serve(settings))
        elif args.command == "user":
            password = args.password or getpass.getpass(f"password for {args.user_id}: ")
            asyncio.run(_add_user(settings, args.user_id, password))
            print(f"created user {args.user_id}")
        elif args.command == "token":
            print(asyncio.run(_token(settings, args.user_id, args.ttl, args.device)))
        elif args.command == "db":
            print(asyncio.run(_db(settings, args.db_command)))
    except (PortInUse, ConfigError, SchemaError) as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 2
    except ChatError as exc:
        print(f"mqchat: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
