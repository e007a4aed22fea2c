"""Cluster mode: several nodes on one PostgreSQL and one Redis (docs/scaling.md).

PostgreSQL stays the only truth: it allocates every seq under its row locks and stores
every message. Redis carries only what can be rebuilt, in the manner of centrifugal's
Redis broker:

- **live events**: a channel per user (``mqchat:u:{user}``) and per group
  (``mqchat:g:{group}``, typing only). A node subscribes while it holds a subscriber (a
  device, a long-poll) and before it reads what that subscriber missed (watch before
  read). What one commit batch produced for a user is one PUBLISH, all of a turn's
  PUBLISHes one pipelined round trip. The node that stored the events delivers them to
  its own devices directly; the others skip their own messages.
- **control** (``mqchat:ctl``, every node): takeovers, closing a device or a user, group
  membership changed, presence changed, "read your streams again".
- **presence**: ``mqchat:dev:{user}`` maps each connected device to the node holding it
  (and the connection's epoch, so an older connection's disconnect never removes a
  newer one); a node's liveness is a key with a TTL its heartbeat renews, and a survivor
  clears the devices of a node whose key expired and publishes their users offline.
- **limits**: send token buckets, connections and new device ids per user, atomically
  in Lua, so a user spreading devices over nodes gets no extra rate.

Redis pub/sub drops what is published while a connection is down. Every loss is repaired
by the per-device cursor: after any reconnect of its subscription (or once the heartbeat
finds Redis answering again after a failure) a node re-runs catch-up for all its devices and
wakes its long-polls; a node that could not publish some users' events tells the others to
re-read those users once it is back; and a probe through the node's own subscription notices
a subscription that died silently. Presence is rebuilt the same way: the node records the
devices it holds again (``rejoin``), since Redis may have restarted empty or missed changes.
While Redis is down sends are still stored and acked (the store does not need Redis), limits
fall back to this node's own counts, and the node reports itself degraded.

Behind Sentinel (``redis+sentinel://``, mqchat/bridge/redis_client.py) a failover is one more
broken link: the old master's connections break (it died) or answer ``READONLY`` (it was
demoted); the node drops its connections, subscribes again on the master the Sentinels name
now, and re-runs catch-up as after any reconnect. What the old master had not yet copied to
its replica (Redis replicates asynchronously) is lost like anything else Redis carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mqchat.bridge import cluster_scripts as scripts
from mqchat.bridge.redis_client import address_of, connect, master_now
from mqchat.config import ClusterSettings
from mqchat.core.ids import DeviceAddress
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)

PREFIX = "mqchat:"
CONTROL = PREFIX + "ctl"
_FRAME = struct.Struct("!HI")
_MAX_UNSENT_USERS = 10_000  # beyond this, a node asks for a resync of everyone instead
# A publish lost on the way (the link, not Redis's answer): worth sending again.
_LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_REDIS_TIMEOUT = 2.0


def user_channel(user_id: str) -> str:
    return f"{PREFIX}u:{user_id}"


def group_channel(group_id: str) -> str:
    return f"{PREFIX}g:{group_id}"


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def encode_items(origin: str, items: Sequence[tuple[str, bytes]]) -> bytes:
    parts = [origin.encode(), b"\n"]
    for topic, payload in items:
        raw = topic.encode()
        parts += (_FRAME.pack(len(raw), len(payload)), raw, payload)
    return b"".join(parts)


def decode_items(data: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    cut = data.index(b"\n")
    origin, pos, items = data[:cut].decode(), cut + 1, []
    while pos < len(data):
        topic_len, payload_len = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        topic = data[pos : pos + topic_len].decode()
        pos += topic_len
        items.append((topic, data[pos : pos + payload_len]))
        pos += payload_len
    return origin, items


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    rate: float
    burst: float


class Degraded(Exception):
    """Redis cannot answer now; the caller falls back to what this node knows."""


Handler = Callable[[list[tuple[str, bytes]]], None]
ControlHandler = Callable[[dict[str, Any]], None]
ResyncHandler = Callable[[set[str] | None], None]
RejoinHandler = Callable[[], Awaitable[None]]


async def _nothing_to_rejoin() -> None:
    return None


class RedisCluster:
    """This node's link to the others. ``start`` before serving, ``stop`` after."""

    def __init__(self, url: str, node_id: str | None, settings: ClusterSettings) -> None:
        self.node_id = node_id or default_node_id()
        self._own_origin = self.node_id.encode() + b"\n"
        self._settings = settings
        # Sentinel or one server (mqchat/bridge/redis_client.py): either way new connections,
        # the subscription's included, go to the current master.
        self._redis = connect(url, timeout=_REDIS_TIMEOUT)
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (
                ("register", scripts.REGISTER),
                ("unregister", scripts.UNREGISTER),
                ("reap", scripts.REAP),
                ("rejoin", scripts.REJOIN),
                ("epoch_floor", scripts.EPOCH_FLOOR),
                ("forget", scripts.FORGET),
                ("buckets", scripts.BUCKETS),
                ("new_device", scripts.NEW_DEVICE),
                ("attempts", scripts.ATTEMPTS),
            )
        }
        self._pubsub: Any = None
        self._watched: dict[str, int] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._outgoing: list[tuple[str, bytes]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._unsent_users: set[str] = set()
        self._unsent_everyone = False
        self._probe_nonce = b""
        self._probe_seen = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()
        self._subscribed = False
        self._healthy = False
        self._resubscribe_pending = False
        self._recovery_due = False
        self._stopping = False
        self._following = False
        self._resubscribing = asyncio.Lock()
        self._sentinels_unreachable = False
        self._serving = False
        self.on_events: Handler = lambda items: None
        self.on_control: ControlHandler = lambda message: None
        self.on_resync: ResyncHandler = lambda users: None
        self.on_rejoin: RejoinHandler = _nothing_to_rejoin
        self.reconnects = 0

    # ------------------------------------------------------------- lifecycle

    async def start(self, *, serve: bool = True) -> None:
        """Connect (waiting, with logged backoff, for a Redis that is down) and start the loops.
        A tool (``serve=False``) only sends: no subscription, no heartbeat."""
        self._serving = serve
        if not serve:
            return
        await self._connect_pubsub(first=True)
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="mqchat-cluster-reader"),
            asyncio.create_task(self._heartbeat_loop(), name="mqchat-cluster-heartbeat"),
            asyncio.create_task(self._probe_loop(), name="mqchat-cluster-probe"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*(stop_task(task) for task in self._tasks), return_exceptions=True)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._serving:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._redis.delete(self._node_key)  # survivors clear our devices at once
        await self._close_pubsub()
        await self._redis.aclose()

    @property
    def healthy(self) -> bool:
        """Subscribed and answering: live delivery across nodes works."""
        return self._healthy and self._subscribed

    @property
    def status(self) -> str:
        return "ok" if self.healthy else "degraded"

    # ------------------------------------------------------------ watching

    async def watch(self, channel: str) -> None:
        """Subscribe (counted) and wait, briefly, until Redis confirms: what is published on the
        channel from then on reaches this node. On failure the node resyncs when Redis is back."""
        count = self._watched.get(channel, 0)
        self._watched[channel] = count + 1
        if count:
            waiter = self._confirmations.get(channel)
            if waiter is not None:
                await asyncio.wait([waiter], timeout=_REDIS_TIMEOUT)
            return
        if not self._subscribed:
            return  # subscribed with all the others on reconnect, then a resync
        if self._serving and not self._healthy:
            # Known unreachable: asking would hold this SUBSCRIBE for redis-py's retries of a
            # silent link (past a client's 10 s). A new subscription takes every watched
            # channel, this one included, and the catch-up after it covers the gap.
            self._request_resubscribe()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = waiter
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                await self._pubsub.subscribe(channel)
            async with asyncio.timeout(_REDIS_TIMEOUT):
                await asyncio.shield(waiter)
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"subscribing to {channel} failed: {exc!r}", exc)
            self._request_resubscribe()  # the channel is not on the subscription we have
        finally:
            if self._confirmations.get(channel) is waiter and waiter.done():
                del self._confirmations[channel]

    def unwatch(self, channel: str) -> None:
        count = self._watched.get(channel, 0) - 1
        if count > 0:
            self._watched[channel] = count
            return
        self._watched.pop(channel, None)
        if self._subscribed and self._pubsub is not None:
            self._spawn(self._unsubscribe(channel))

    async def _unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            if channel not in self._watched:
                await self._pubsub.unsubscribe(channel)

    # ---------------------------------------------------------- publishing

    def publish(self, channel: str, items: Sequence[tuple[str, bytes]], *, user_id: str | None = None) -> None:
        """Queue one message for ``channel``; every message of this turn goes in one pipeline."""
        self._outgoing.append((channel, encode_items(self.node_id, items)))
        if user_id is not None and not self._healthy:
            self._remember_unsent([user_id])
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def control(self, op: str, **fields: Any) -> None:
        """Tell every node (this one included, which ignores its own)."""
        message = json.dumps({"op": op, "node": self.node_id, **fields}).encode()
        self._outgoing.append((CONTROL, message))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._outgoing:
            return
        batch, self._outgoing = self._outgoing, []
        self._spawn(self._send(batch))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel, message in batch:
                    pipe.publish(channel, message)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._remember_unsent(channel.removeprefix(PREFIX + "u:") for channel, _ in batch)
            if isinstance(exc, _LINK_ERRORS):  # an error reply (say NOPERM) would only repeat
                self._resync_again(message for channel, message in batch if channel == CONTROL)
            self._broken(f"publishing failed: {exc!r}", exc)

    def _remember_unsent(self, users: Iterable[str]) -> None:
        """Users whose events the other nodes may have missed: they re-read them when we are back."""
        for user in users:
            if user.startswith(PREFIX):
                continue  # control and group messages: ephemeral
            self._unsent_users.add(user)
        if len(self._unsent_users) > _MAX_UNSENT_USERS:
            self._unsent_users.clear()
            self._unsent_everyone = True

    def _resync_again(self, controls: Iterable[bytes]) -> None:
        """Other control messages are ephemeral, but a ``resync`` is the recovery itself: its
        users go back on the list, and the next recovery (``_broken`` makes one due) asks again."""
        for data in controls:
            message = json.loads(data)
            if message.get("op") != "resync":
                continue
            if message.get("users") is None:
                self._unsent_everyone = True
            else:
                self._remember_unsent(message["users"])

    # ------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        # Each loop also ends on ``_stopping``: Python 3.11's ``asyncio.wait_for`` (inside redis-py;
        # ours use asyncio.timeout) can swallow a cancellation that lands as its inner call finishes,
        # and a loop that went on would hold ``stop()`` for ever (a test caught a heartbeat doing so).
        while not self._stopping:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError, TimeoutError, AttributeError) as exc:
                if self._stopping:
                    return
                self._broken(f"the subscription failed: {exc!r}", exc)
                await self._reconnect()
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"].decode()
        if kind == "subscribe":
            waiter = self._confirmations.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if kind != "message":
            return
        data: bytes = message["data"]
        if channel == CONTROL:
            self._on_control(data)
        elif channel == self._probe_channel:
            if data == self._probe_nonce:
                self._probe_seen.set()
        elif not data.startswith(self._own_origin):  # our own: delivered here when stored
            self.on_events(decode_items(data)[1])

    def _on_control(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("node") != self.node_id:
            self.on_control(message)

    # ------------------------------------------------------- (re)connecting

    async def _connect_pubsub(self, *, first: bool = False) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                pubsub = self._redis.pubsub()
                channels = [CONTROL, self._probe_channel, *self._watched]
                waiters = {c: asyncio.get_running_loop().create_future() for c in channels}
                self._confirmations.update(waiters)
                self._pubsub = pubsub
                await pubsub.subscribe(*channels)
                while not all(w.done() for w in waiters.values()):
                    async with asyncio.timeout(_REDIS_TIMEOUT * 2):
                        message = await pubsub.get_message(timeout=_REDIS_TIMEOUT)
                    if message is None:
                        raise TimeoutError("no subscription confirmation")
                    self._dispatch(message)
                await self._redis.set(self._node_key, self.node_id, px=int(self._settings.node_ttl_seconds * 1000))
                await self._redis.sadd(PREFIX + "nodes", self.node_id)
                self._subscribed = self._healthy = True
                if not first:
                    self.reconnects += 1
                    log.warning("cluster: Redis is back (reconnect %d): reading every stream again", self.reconnects)
                    self._after_reconnect()
                return
            except (RedisError, OSError, TimeoutError) as exc:
                await self._close_pubsub()
                if isinstance(exc, ReadOnlyError):
                    await self._drop_connections()  # a replica (demoted master): look it up again
                log.warning("cluster: cannot reach Redis (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _after_reconnect(self) -> None:
        # Whatever was published while we were away may be lost: our devices and long-polls
        # read their streams again; and the others re-read the users we could not publish for.
        # What Redis knows of our devices may be gone too (it restarted empty, or a survivor
        # reaped us): record them again, and forget those that left while it could not hear.
        self._recovery_due = False
        self._spawn(self.on_rejoin())
        self.on_resync(None)
        if self._unsent_everyone:
            self.control("resync", users=None)
        elif self._unsent_users:
            users = sorted(self._unsent_users)
            for start in range(0, len(users), 1000):
                self.control("resync", users=users[start : start + 1000])
        self._unsent_users.clear()
        self._unsent_everyone = False

    async def _reconnect(self) -> None:
        await self._close_pubsub()
        await self._connect_pubsub()

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._subscribed = False
        for waiter in self._confirmations.values():
            if not waiter.done():
                waiter.cancel()
        self._confirmations.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_REDIS_TIMEOUT):
                    await pubsub.aclose()

    def _broken(self, why: str, exc: BaseException | None = None) -> None:
        if self._healthy:
            log.warning("cluster: %s; degraded until Redis answers again", why)
        self._healthy = False
        # Whatever failed (a publish, an unregister, the subscription's bytes) may have been lost
        # even if the subscription itself survives: recover as after a reconnect.
        self._recovery_due = True
        if isinstance(exc, ReadOnlyError) and not self._following and not self._stopping and self._tasks:
            # The server we write to was demoted to a replica (a failover): our subscription is
            # most likely on it too, where the others no longer publish. Start over on the master.
            self._following = True
            self._spawn(self._follow_master())

    async def _follow_master(self) -> None:
        try:
            await self._drop_connections()
            await self._resubscribe()
        finally:
            self._following = False

    async def _drop_connections(self) -> None:
        """Close every pooled connection, so the next ones look the master up again (Sentinel,
        or DNS behind a plain URL) instead of reusing a link to a demoted server."""
        with contextlib.suppress(RedisError, OSError):
            await self._redis.connection_pool.disconnect()

    def _request_resubscribe(self) -> None:
        """A new subscription soon, once however often it is asked for meanwhile."""
        if self._stopping or self._resubscribe_pending or not self._tasks:
            return
        self._resubscribe_pending = True

        async def resubscribe() -> None:
            try:
                await self._resubscribe()
            finally:
                self._resubscribe_pending = False

        self._spawn(resubscribe())

    async def _resubscribe(self) -> None:
        """Replace the subscription (and its reader) with a new one on the current master; the
        reconnect re-runs catch-up for every local device."""
        async with self._resubscribing:
            if self._stopping or not self._tasks:
                return
            # Not gather: a reader that loses its cancellation (redis-py still uses wait_for)
            # would hold _resubscribing, and with it every later resubscribe, for ever.
            with contextlib.suppress(Exception):
                await stop_task(self._tasks[0])
            await self._reconnect()
            self._tasks[0] = asyncio.create_task(self._read_loop(), name="mqchat-cluster-reader")

    # ------------------------------------------------------------ liveness

    @property
    def _node_key(self) -> str:
        return f"{PREFIX}node:{self.node_id}"

    @property
    def _probe_channel(self) -> str:
        return f"{PREFIX}probe:{self.node_id}"

    async def _heartbeat_loop(self) -> None:
        ttl_ms = int(self._settings.node_ttl_seconds * 1000)
        while not self._stopping:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            try:
                await self._redis.set(self._node_key, self.node_id, px=ttl_ms)
                await self._redis.sadd(PREFIX + "nodes", self.node_id)
                if self._subscribed:
                    self._healthy = True
                    if self._recovery_due:
                        log.warning("cluster: Redis answers again: reading every stream again")
                        self._after_reconnect()
                await self._check_master()
                await self._reap_dead_nodes()
            except (RedisError, OSError, TimeoutError) as exc:
                self._broken(f"the heartbeat failed: {exc!r}", exc)

    async def _check_master(self) -> None:
        """Behind Sentinel: follow a new master even while the old one still answers."""
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):  # the heartbeat must go on
                master = await master_now(self._redis)
        except (RedisError, OSError, TimeoutError) as exc:
            # The master still answers (the heartbeat just wrote to it): no reason to degrade.
            # Say so once; new connections will fail until a Sentinel answers again.
            if not self._sentinels_unreachable:
                log.warning("cluster: cannot ask the Sentinels where the master is (%r)", exc)
            self._sentinels_unreachable = True
            return
        self._sentinels_unreachable = False
        if master is None or self._following or not self._subscribed:
            return
        subscribed_at = address_of(self._pubsub)
        if subscribed_at is not None and subscribed_at != master:
            log.warning(
                "cluster: the Sentinels name %s:%d as master, our subscription is on %s:%d: following",
                *master,
                *subscribed_at,
            )
            self._healthy = False
            self._following = True
            self._spawn(self._follow_master())

    async def _probe_loop(self) -> None:
        """A subscription can die without an error (a half-open connection): send ourselves a
        message and reconnect when it does not come back."""
        while not self._stopping:
            await asyncio.sleep(self._settings.probe_seconds)
            if not self._subscribed:
                continue
            self._probe_nonce = secrets.token_hex(8).encode()
            self._probe_seen.clear()
            try:
                await self._redis.publish(self._probe_channel, self._probe_nonce)
                async with asyncio.timeout(self._settings.probe_timeout_seconds):
                    await self._probe_seen.wait()
            except (RedisError, OSError, TimeoutError) as exc:
                if self._stopping:
                    return
                self._broken(f"the subscription did not answer its probe ({exc!r})", exc)
                await self._resubscribe()

    async def _reap_dead_nodes(self) -> None:
        nodes = [_text(node) for node in await self._redis.smembers(PREFIX + "nodes")]
        others = [node for node in nodes if node != self.node_id]
        if not others:
            return
        alive = await self._redis.mget([f"{PREFIX}node:{node}" for node in others])
        for node, key in zip(others, alive, strict=True):
            if key is None and await self._redis.set(f"{PREFIX}reaping:{node}", self.node_id, nx=True, ex=60):
                await self._reap(node)

    async def _reap(self, node: str) -> None:
        """Clear the devices of a dead node; tell everyone which users went offline."""
        members_key = f"{PREFIX}nodedev:{node}"
        members = [_text(member) for member in await self._redis.smembers(members_key)]
        now = str(time.time())
        offline = []
        for start in range(0, len(members), 500):
            chunk = members[start : start + 500]
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in chunk:
                    user_id, _, device_id = member.partition("\t")
                    await self._scripts["reap"](
                        keys=[f"{PREFIX}dev:{user_id}", f"{PREFIX}seen:{user_id}"],
                        args=[device_id, node, now],
                        client=pipe,
                    )
                results = await pipe.execute()
            offline += [m.partition("\t")[0] for m, left in zip(chunk, results, strict=True) if left == 0]
        await self._redis.delete(members_key)
        await self._redis.srem(PREFIX + "nodes", node)
        log.warning("cluster: node %s is gone; cleared %d devices, %d users offline", node, len(members), len(offline))
        for user_id in sorted(set(offline)):
            self.control("presence", user=user_id, status="offline", last_seen=float(now))
            self.on_control({"op": "presence", "user": user_id, "status": "offline", "last_seen": float(now)})

    # ------------------------------------------------------- devices, presence

    def _fail_fast(self) -> None:
        """Known unreachable: the caller falls back to this node's own knowledge at once.
        Asking would hold each call for the client's timeouts (about 4 s a send batch over a
        silent link, measured in tests/cluster/test_redis_faults.py; a connecting device makes
        three such calls). The heartbeat tells when Redis is back, and the recovery records
        again what was skipped meanwhile (``rejoin``)."""
        if self._serving and not self._healthy:
            raise Degraded("Redis is unreachable")

    async def register(self, device: DeviceAddress, epoch: int, limit: int) -> tuple[bool, int]:
        """Record the device as connected here, unless the user has ``limit`` other devices
        connected anywhere; (allowed, devices the user had before). Raises ``Degraded``."""
        self._fail_fast()
        try:
            user = device.user_id
            allowed, before = await self._scripts["register"](
                keys=[f"{PREFIX}dev:{user}", f"{PREFIX}nodedev:{self.node_id}", f"{PREFIX}seen:{user}"],
                args=[device.device_id, f"{self.node_id}:{epoch}", self.node_id, limit, _member(device), time.time()],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"registering {device.client_id} failed: {exc!r}", exc)
            raise Degraded from exc
        return bool(allowed), int(before)

    async def unregister(self, device: DeviceAddress, epoch: int) -> int:
        """Devices the user still has connected (-1: a newer connection holds this device)."""
        self._fail_fast()
        try:
            user = device.user_id
            left = await self._scripts["unregister"](
                keys=[f"{PREFIX}dev:{user}", f"{PREFIX}nodedev:{self.node_id}", f"{PREFIX}seen:{user}"],
                args=[device.device_id, f"{self.node_id}:{epoch}", _member(device), str(time.time())],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"unregistering {device.client_id} failed: {exc!r}", exc)
            raise Degraded from exc
        return int(left)

    async def rejoin(self, held: dict[DeviceAddress, int]) -> tuple[set[str], set[str]]:
        """Make Redis's record of this node's devices ``held`` (device -> epoch; the caller's live
        map, which devices connecting meanwhile change) again: record the missing ones, remove the
        ones that left while Redis could not hear it. Returns the users that came online and those
        that went offline by it. Raises ``Degraded``."""
        came, went = set(), set()
        now = str(time.time())
        try:
            devices = list(held.items())
            if devices:
                await self._scripts["epoch_floor"](keys=[PREFIX + "epoch"], args=[max(e for _, e in devices)])
            for start in range(0, len(devices), 500):
                chunk = devices[start : start + 500]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for device, epoch in chunk:
                        user = device.user_id
                        await self._scripts["rejoin"](
                            keys=[f"{PREFIX}dev:{user}", f"{PREFIX}nodedev:{self.node_id}", f"{PREFIX}seen:{user}"],
                            args=[device.device_id, f"{self.node_id}:{epoch}", epoch, _member(device), now],
                            client=pipe,
                        )
                    results = await pipe.execute()
                came |= {device.user_id for (device, _), result in zip(chunk, results, strict=True) if result == 0}
            went = await self._forget_left(held, now)
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"registering this node's devices again failed: {exc!r}")
            raise Degraded from exc
        return came, went - {device.user_id for device in held}

    async def _forget_left(self, held: dict[DeviceAddress, int], now: str) -> set[str]:
        """Unregister the devices Redis has on this node that are not ``held`` (they disconnected
        while Redis could not hear it); the users left without a device."""
        members = [_text(member) for member in await self._redis.smembers(f"{PREFIX}nodedev:{self.node_id}")]
        went = set()
        for member in members:
            user_id, _, device_id = member.partition("\t")
            value = await self._redis.hget(f"{PREFIX}dev:{user_id}", device_id)
            holder = None if value is None else _text(value)
            epoch = held.get(DeviceAddress(user_id, device_id))
            if epoch is not None and holder in (None, f"{self.node_id}:{epoch}"):
                continue  # held here by that very connection, or its registration is on its way
            # Not held here (any more): the script removes the entry only if it is still that old
            # connection of this node's; another node's entry stays (only our set forgets it).
            ours = holder if holder is not None and holder.startswith(self.node_id + ":") else ""
            left = await self._scripts["forget"](
                keys=[f"{PREFIX}dev:{user_id}", f"{PREFIX}nodedev:{self.node_id}", f"{PREFIX}seen:{user_id}"],
                args=[device_id, ours, member, now, self.node_id],
            )
            if left == 0:
                went.add(user_id)
        return went

    async def presence(self, user_id: str) -> tuple[bool, float | None]:
        """(online anywhere, last seen as a UNIX time)."""
        self._fail_fast()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hlen(f"{PREFIX}dev:{user_id}")
                pipe.get(f"{PREFIX}seen:{user_id}")
                devices, seen = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"reading presence failed: {exc!r}", exc)
            raise Degraded from exc
        return int(devices) > 0, None if seen is None else float(seen)

    async def next_epoch(self) -> int:
        """A cluster-wide increasing number: the newer of two connections of a client id wins."""
        self._fail_fast()
        try:
            return int(await self._redis.incr(PREFIX + "epoch"))
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"allocating an epoch failed: {exc!r}", exc)
            raise Degraded from exc

    # -------------------------------------------------------------- limits

    async def take(self, requests: Sequence[Sequence[Bucket]]) -> list[float]:
        """One token from every bucket of each request, atomically across the cluster; per
        request 0 (passed) or the seconds until it would pass. Raises ``Degraded``."""
        keys: list[str] = []
        params: list[float] = []
        index: dict[str, int] = {}
        plan: list[int] = []
        for buckets in requests:
            for bucket in buckets:
                if bucket.key not in index:
                    keys.append(PREFIX + "rl:" + bucket.key)
                    params += (bucket.rate, bucket.burst)
                    index[bucket.key] = len(keys)
                plan.append(index[bucket.key])
            plan.append(0)
        self._fail_fast()
        try:
            waits = await self._scripts["buckets"](keys=keys, args=[time.time(), *params, len(requests), *plan])
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"the rate limits failed: {exc!r}", exc)
            raise Degraded from exc
        return [float(wait) for wait in waits]

    async def admit_new_device(self, device: DeviceAddress, limit: int, window: float) -> bool:
        self._fail_fast()
        try:
            return bool(
                await self._scripts["new_device"](
                    keys=[f"{PREFIX}newdev:{device.user_id}"], args=[device.device_id, time.time(), window, limit]
                )
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"the device-id budget failed: {exc!r}", exc)
            raise Degraded from exc

    async def count_attempt(self, limits: Sequence[tuple[str, int]], window: float, member: str) -> float:
        """Count one attempt under every ``(key, limit)`` in a sliding ``window``, if each has room;
        else the wait before one more may be made. Raises ``Degraded``."""
        keys = [PREFIX + "at:" + key for key, _ in limits]
        self._fail_fast()
        try:
            wait = await self._scripts["attempts"](
                keys=keys, args=[time.time(), window, member, *(limit for _, limit in limits)]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._broken(f"the attempt counter failed: {exc!r}", exc)
            raise Degraded from exc
        return float(wait)

    async def forget_attempt(self, keys: Sequence[str], member: str | None) -> None:
        """Take one attempt back (``member``), or every attempt of the keys (None)."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            for key in keys:
                if member is None:
                    await self._redis.delete(PREFIX + "at:" + key)
                else:
                    await self._redis.zrem(PREFIX + "at:" + key, member)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False


def _member(device: DeviceAddress) -> str:
    return f"{device.user_id}\t{device.device_id}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
