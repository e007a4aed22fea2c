"""``mqchat serve | user ... | group ... | push ... | backup | restore | token | db | bench | chat``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mqchat import __version__, logs
from mqchat.bench import command as bench_command
from mqchat.bridge.admin import Administration
from mqchat.bridge.composition import build_services
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.storage.backup import (
    DOCS,
    BackupError,
    backup_postgres,
    backup_sqlite,
    database_file,
    restore_sqlite,
)
from mqchat.bridge.storage.database import is_sqlite
from mqchat.bridge.storage.schema import SchemaError, known_revisions
from mqchat.bridge.store import GroupSummary, UserRecord
from mqchat.clients.terminal import add_chat_arguments, run_chat
from mqchat.config import Settings
from mqchat.core.errors import AccountDisabled, ChatError
from mqchat.core.protocol import format_time
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
    serve.add_argument(
        "--redis-url",
        help="cluster mode: e.g. redis://127.0.0.1:6379/0, or redis+sentinel://h1:26379,h2:26379/SERVICE"
        " (default: a single node)",
    )
    serve.add_argument("--node-id", help="this node's name in the cluster (default: host name and process id)")
    serve.add_argument("--log-format", choices=("text", "json"), help="text or JSON lines (default text)")

    user = commands.add_parser("user", help="manage accounts")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser("add", help="create a user")
    _common(add)
    add.add_argument("user_id")
    add.add_argument("--password", help="prompted for when omitted")
    add.add_argument("--admin", action="store_true", help="make the user an administrator")
    listing = user_commands.add_parser("list", help="list the accounts")
    _common(listing)
    listing.add_argument("--all", action="store_true", help="include deleted accounts")
    for name, what in (
        ("disable", "refuse the user's logins and tokens and close their connections"),
        ("enable", "let a disabled user log in again"),
        ("delete", "delete the user: devices, tokens, stream; messages they sent become tombstones"),
        ("passwd", "set a user's password; every earlier token stops working"),
        ("admin", "make the user an administrator (--revoke: no longer)"),
    ):
        one = user_commands.add_parser(name, help=what)
        _common(one)
        one.add_argument("user_id")
        if name == "delete":
            one.add_argument("--yes", action="store_true", help="needed: deleting cannot be undone")
        elif name == "passwd":
            one.add_argument("--password", help="prompted for when omitted")
        elif name == "admin":
            one.add_argument("--revoke", action="store_true", help="take the administrator role away")

    group = commands.add_parser("group", help="look at groups")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    _common(group_commands.add_parser("list", help="list the groups"))
    show = group_commands.add_parser("show", help="a group's owner and members")
    _common(show)
    show.add_argument("group_id")

    push = commands.add_parser("push", help="the push outbox (push hooks for offline users)")
    push_commands = push.add_subparsers(dest="push_command", required=True)
    _common(push_commands.add_parser("status", help="events waiting and dead-lettered"))
    _common(push_commands.add_parser("requeue", help="queue every dead-lettered event again"))

    token = commands.add_parser("token", help="print an access token for a user (for scripts and mosquitto_sub)")
    _common(token)
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, help="lifetime in seconds (default: auth.token_ttl_seconds)")
    token.add_argument("--device", help="scope the token to this device id (default: any device of the user)")
    backup = commands.add_parser("backup", help="a consistent copy of the database, also while serving")
    _common(backup)
    backup.add_argument("file", type=Path, help="where to write it (replaced if it exists)")
    restore = commands.add_parser("restore", help="replace the database with a backup (no server may run)")
    _common(restore)
    restore.add_argument("file", type=Path, help="a file written by mqchat backup")
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
    for key in ("data_dir", "database_url", "log_level", "log_format", "redis_url", "node_id"):
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


def _missing_data_dir(command: str, settings: Settings) -> str | None:
    """Why a command other than ``serve`` cannot run here: it needs a data dir that does not
    exist. Run from another folder, ``mqchat token alice`` used to create an empty
    ``./mqchat-data`` and answer "no such user"."""
    if command == "serve" or settings.data_dir.is_dir():
        return None
    needs_it = settings.database_url is None or (command != "db" and not settings.auth.secret)
    if not needs_it:
        return None
    return (
        f"the data directory {settings.data_dir} ({settings.data_dir.resolve()}) does not exist; "
        "run this where `mqchat serve` keeps its data, or pass --data-dir (or set MQCHAT_DATA_DIR); "
        "`mqchat serve` creates it"
    )


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
            raise ConfigError("event_loop = uvloop, but uvloop is not installed (pip install uvloop)") from None
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


async def _user(settings: Settings, args: argparse.Namespace) -> str:
    """``mqchat user ...``: one line (or a table) to print."""
    command = args.user_command
    if command == "delete" and not args.yes:
        raise ConfigError(f"deleting {args.user_id} cannot be undone: add --yes")
    password = None
    if command in ("add", "passwd"):
        password = args.password or getpass.getpass(f"password for {args.user_id}: ")
    async with build_services(settings) as services:
        admin = services.ops.admin
        if command == "add":
            assert password is not None
            await admin.add_user(args.user_id, password, role="admin" if args.admin else "user")
            return f"created {'administrator' if args.admin else 'user'} {args.user_id}"
        if command == "list":
            return _user_table(await _all_users(admin, include_deleted=args.all))
        if command == "disable":
            changed = await admin.disable(args.user_id)
            return f"disabled {args.user_id}" if changed else f"{args.user_id} was disabled already"
        if command == "enable":
            changed = await admin.enable(args.user_id)
            return f"enabled {args.user_id}" if changed else f"{args.user_id} was not disabled"
        if command == "delete":
            await admin.delete(args.user_id)
            return f"deleted {args.user_id}"
        if command == "passwd":
            assert password is not None
            await admin.set_password(args.user_id, password)
            return f"changed the password of {args.user_id}; their earlier tokens no longer work"
        await admin.set_role(args.user_id, "user" if args.revoke else "admin")
        return f"{args.user_id} is {'no longer' if args.revoke else 'now'} an administrator"


async def _all_users(admin: Administration, *, include_deleted: bool) -> list[UserRecord]:
    found: list[UserRecord] = []
    while page := await admin.list_users(found[-1].user_id if found else "", 1000, include_deleted=include_deleted):
        found += page
    return found


def _user_table(records: list[UserRecord]) -> str:
    rows = [("USER", "ROLE", "STATUS", "CREATED", "LAST SEQ")]
    rows += [(r.user_id, r.role, r.status, format_time(r.created_at), str(r.last_seq)) for r in records]
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


async def _group(settings: Settings, args: argparse.Namespace) -> str:
    async with build_services(settings) as services:
        admin = services.ops.admin
        if args.group_command == "show":
            info = await admin.group(args.group_id)
            return (
                f"{info.group_id}  {info.name!r}\nowner: {info.owner}\ncreated: {format_time(info.created_at)}\n"
                f"members ({len(info.members)}): {' '.join(info.members)}"
            )
        found: list[GroupSummary] = []
        while page := await admin.list_groups(found[-1].group_id if found else "", 1000):
            found += page
        rows = [("GROUP", "NAME", "OWNER", "MEMBERS", "CREATED")]
        rows += [(g.group_id, g.name, g.owner, str(g.members), format_time(g.created_at)) for g in found]
        return _table(rows)


async def _token(settings: Settings, user_id: str, ttl: int | None, device_id: str | None = None) -> str:
    async with build_services(settings) as services:
        standing = await services.store.token_standing(user_id, None)
        if standing is None:
            raise ChatError(f"no such user {user_id!r}")
        if standing.disabled:
            raise AccountDisabled(f"{user_id} is disabled (mqchat user enable {user_id})")
        return services.tokens.issue(user_id, ttl, device_id=device_id)


async def _push(settings: Settings, command: str) -> str:
    settings.prepare_data_dir()
    store = SqlStore.from_url(settings.resolved_database_url())
    try:
        await store.migrate(apply=settings.database.auto_migrate)
        if command == "requeue":
            count = await store.requeue_dead_push_events(time.time_ns() // 1_000_000)
            return f"queued {count} dead-lettered events again"
        depths = await store.push_depths()
        return f"pending {depths['pending']}, dead {depths['dead']}"
    finally:
        await store.close()


def _backup(settings: Settings, target: Path) -> str:
    url = settings.resolved_database_url()
    database = database_file(url)
    started = time.monotonic()
    if database is None:
        if is_sqlite(url):
            raise BackupError("an in-memory database has nothing to back up")
        size = backup_postgres(url, target)
        return f"backed up the PostgreSQL database to {target} with pg_dump ({size:,} bytes)"
    summary = backup_sqlite(database, target)
    took = time.monotonic() - started
    return f"backed up {database} to {target} in {took:.1f} s: {summary.describe()}"


def _restore(settings: Settings, backup: Path) -> str:
    url = settings.resolved_database_url()
    database = database_file(url)
    if database is None:
        raise BackupError(
            "mqchat restore restores SQLite backups; restore PostgreSQL with pg_restore into a database "
            f"no node uses ({DOCS})"
        )
    settings.prepare_data_dir()
    summary, kept = restore_sqlite(backup, database, known_revisions())
    before = f"; the database it replaced is kept as {kept}" if kept is not None else ""
    return f"restored {backup} into {database}: {summary.describe()}{before}"


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
    missing = _missing_data_dir(args.command, settings)
    if missing:
        print(f"mqchat: {missing}", file=sys.stderr)
        return 2
    # Text or JSON lines, with the node id; libraries that would log payloads stay at WARNING.
    logs.configure(settings.log_level, settings.log_format, settings.resolved_node_id())
    try:
        if args.command == "serve":
            with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
                runner.run(_serve(settings))
        elif args.command == "user":
            print(asyncio.run(_user(settings, args)))
        elif args.command == "group":
            print(asyncio.run(_group(settings, args)))
        elif args.command == "push":
            print(asyncio.run(_push(settings, args.push_command)))
        elif args.command == "backup":
            print(_backup(settings, args.file))
        elif args.command == "restore":
            print(_restore(settings, args.file))
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
    except BackupError as exc:
        print(f"mqchat: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
