"""Every Redis client mqchat uses is built here, from one ``redis_url``.

Two forms:

- ``redis://``, ``rediss://`` (TLS) and ``unix://``: one server, as redis-py's ``from_url`` reads them.
- ``redis+sentinel://[user:password@]host1:26379,host2:26379,host3:26379/SERVICE[/DB]
  [?sentinel_username=...&sentinel_password=...]``: ask the Sentinels which server is the
  master of ``SERVICE`` (the spelling of prefect-redis, redis-vl and Redis-Sentinel-Url). A
  Sentinel without a port is on 26379. ``user:password`` authenticate to the Redis servers,
  ``sentinel_username`` / ``sentinel_password`` to the Sentinels (which often have none).

With Sentinel every new connection asks the Sentinels for the master first, so after a failover
commands and the pub/sub connection alike go to the new master (publish and subscribe must
meet on one server). A connection to the old master breaks (it died) or is refused as
read-only (it was demoted); redis-py turns the latter into a ``ConnectionError`` for
Sentinel-managed pools, and the cluster link treats both as a broken link: reconnect, resync.

``parse_redis_url`` is pure (the settings validate the URL with it at start-up);
``connect`` builds the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_FORMS = (
    "redis://[user:password@]host:port[/db], rediss://... (TLS), unix:///path.sock, or "
    "redis+sentinel://[user:password@]host1:26379,host2:26379/SERVICE[/db][?sentinel_password=...]"
)


class RedisUrlError(ValueError):
    """The URL cannot work; the message names the problem and never repeats a password."""


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed and checked."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if not self.sentinels:
            raise RedisUrlError("a redis+sentinel:// URL names no Sentinel (host:port, comma-separated)")
        if not self.service:
            raise RedisUrlError("a redis+sentinel:// URL needs the service name: .../SERVICE_NAME[/db]")
        if self.db < 0:
            raise RedisUrlError(f"the database number must be 0 or more, not {self.db}")


@dataclass(frozen=True, slots=True)
class PlainTarget:
    """One Redis server, as redis-py reads the URL."""

    url: str


RedisTarget = SentinelTarget | PlainTarget


def parse_redis_url(url: str) -> RedisTarget:
    """Check ``url`` and say which kind it is; raises ``RedisUrlError`` naming the problem."""
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise RedisUrlError(f"not a URL (no scheme://); expected {_FORMS}")
    if scheme in PLAIN_SCHEMES:
        return PlainTarget(url)
    if scheme == SENTINEL_SCHEME:
        return _parse_sentinel(url)
    if scheme.endswith("+sentinel"):
        raise RedisUrlError(f"{scheme}:// is not supported (TLS through Sentinel is not built yet); expected {_FORMS}")
    raise RedisUrlError(f"unknown scheme {scheme}://; expected {_FORMS}")


def _parse_sentinel(url: str) -> SentinelTarget:
    # Split by hand: urlsplit cannot read a comma-separated host list (``.port`` fails, and some
    # Python versions refuse a list that mixes bracketed IPv6 hosts with others).
    rest = url.partition("://")[2]
    rest, hash_mark, _ = rest.partition("#")
    if hash_mark:
        raise RedisUrlError("a redis+sentinel:// URL takes no #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path_text = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    sentinels = tuple(_host_port(item) for item in hosts.split(","))
    path = [unquote(p) for p in path_text.split("/")] if slash else []
    if not path or not path[0]:
        raise RedisUrlError("a redis+sentinel:// URL needs the service name: host:26379,.../SERVICE_NAME[/db]")
    if len(path) > 2 or (len(path) == 2 and not path[1]):
        raise RedisUrlError("after the service name only a database number may follow: .../SERVICE_NAME/0")
    db = _number(path[1], "the database number") if len(path) == 2 else 0
    options = _options(query)
    return SentinelTarget(
        sentinels=sentinels,
        service=path[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
    )


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise RedisUrlError("an empty Sentinel address in the host list (a stray comma?)")
    if item.startswith("["):  # IPv6: [::1]:26379
        host, bracket, rest = item[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise RedisUrlError(f"cannot read the Sentinel address {item!r} (IPv6 is written [::1]:26379)")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
        if not host or ":" in port_text:
            raise RedisUrlError(f"cannot read the Sentinel address {item!r} (expected host:port)")
    port = _number(port_text, f"the port of Sentinel {host}") if port_text else SENTINEL_PORT
    if not 1 <= port <= 65535:
        raise RedisUrlError(f"the port of Sentinel {host} must be 1-65535, not {port}")
    return host, port


def _number(text: str, what: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"{what} must be a number, not {text!r}")
    return int(text)


def _options(query: str) -> dict[str, str]:
    try:
        raw = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise RedisUrlError(f"cannot read the URL's options: {exc}") from None
    unknown = sorted(set(raw) - set(_SENTINEL_OPTIONS))
    if unknown:
        raise RedisUrlError(f"unknown option(s) {unknown} in a redis+sentinel:// URL; known: {list(_SENTINEL_OPTIONS)}")
    repeated = sorted(name for name, values in raw.items() if len(values) > 1)
    if repeated:
        raise RedisUrlError(f"option(s) {repeated} given more than once")
    return {name: values[0] for name, values in raw.items()}


POOL_SIZE = 100
"""Connections a node keeps to Redis at most (redis-py's default, said out loud)."""


class _WaitForRoom:
    """A pool that makes a command wait for a free connection instead of failing.

    redis-py's pool raises ``MaxConnectionsError`` at once when all its connections are busy:
    500 devices connecting at once (each registering in Redis) made 400 of them fail, and the
    node declared Redis broken. Here a command waits up to the socket timeout for a connection
    to come back, as ``BlockingConnectionPool`` does for plain pools (it cannot be combined
    with the Sentinel pool)."""

    _room: asyncio.Condition
    _wait: float

    def _make_room(self, wait: float | None) -> None:
        self._room = asyncio.Condition()
        self._wait = wait or 2.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while True:
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[misc]
            except MaxConnectionsError:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                async with self._room:
                    # A release between the refusal and here is missed: the wait then ends at
                    # the next release (or the deadline), never hangs.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._room.wait()

    async def release(self, connection: Any) -> None:
        await super().release(connection)  # type: ignore[misc]
        async with self._room:
            self._room.notify()


class _Pool(_WaitForRoom, redis.ConnectionPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._make_room(kwargs.get("socket_timeout"))


class _LastKnownMasterPool(_WaitForRoom, SentinelConnectionPool):
    """A new connection goes to the master the Sentinels name; when none names one (all down,
    or the master is down and not yet replaced), to the master they named last. Without this a
    node whose Sentinels are all down could not open one more connection to a master that works.
    A dead old master refuses the connection anyway, and a demoted one answers ``READONLY``,
    which redis-py turns into a ``ConnectionError``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        self._make_room(kwargs.get("socket_timeout"))

    async def get_master_address(self) -> Any:
        try:
            return await super().get_master_address()  # type: ignore[no-untyped-call]
        except MasterNotFoundError:
            if self.master_address is None:
                raise
            return self.master_address


class _SentinelMaster(redis.Redis):
    """The master's client; closing it also closes the clients it keeps to the Sentinels."""

    _sentinel: Sentinel | None = None

    def owns(self, sentinel: Sentinel) -> None:
        self._sentinel = sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            await sentinel.aclose()


def connect(url: str, *, timeout: float, decode_responses: bool = False) -> redis.Redis:
    """A client for ``url`` (either form). ``timeout`` bounds connecting and each reply, for the
    Redis servers and the Sentinels alike. Nothing is connected until the first command."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode_responses,
        "max_connections": POOL_SIZE,
    }
    if isinstance(target, PlainTarget):
        return redis.Redis.from_pool(_Pool.from_url(target.url, **options))
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            # One try each: the next Sentinel is the retry. redis-py's default (10 tries with
            # back-off) made one lookup with every Sentinel down take about 20 s.
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client = cast(
        _SentinelMaster,
        sentinel.master_for(
            target.service,
            redis_class=_SentinelMaster,
            connection_pool_class=_LastKnownMasterPool,
            db=target.db,
            username=target.username,
            password=target.password,
            **options,
        ),
    )
    client.owns(sentinel)
    return client


async def master_now(client: redis.Redis) -> tuple[str, int] | None:
    """The address the Sentinels name as master now (None for a plain URL). A failover that
    leaves the old master alive (``SENTINEL FAILOVER``, a partition that heals) lets it serve
    until the Sentinels reconfigure it, seconds later: a connection opened before still works
    there, where the other nodes may no longer be. Asking is how a node notices at once.
    Raises ``MasterNotFoundError`` when no Sentinel names a master."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return None
    host, port = await pool.sentinel_manager.discover_master(pool.service_name)
    return str(host), int(port)


def address_of(pubsub: Any) -> tuple[str, int] | None:
    """Where a pub/sub object is connected (None: not connected)."""
    connection = getattr(pubsub, "connection", None)
    if connection is None:
        return None
    return str(connection.host), int(connection.port)
