"""Prometheus metrics of one node (docs/operations.md, "Metrics").

One ``Metrics`` per ``Services``, with registries of its own: two servers in one process
(the tests run many) never share a counter, and nothing here is module-level state. The
chat service, the broker and the API call the small methods below, one line each; what can
be read when scraped (queue depth, connected devices, long-polls waiting) is read then,
through callbacks, and costs nothing in between.

Every sample carries a ``node`` label (settings ``node_id``, else the host name): the
metrics are built unlabelled in an inner registry and ``_NodeLabelled`` adds the label to
each sample as it is collected, prometheus-client's process and GC collectors included.
Counters' ``*_created`` samples are left out: nothing here reads them.

Loss, as the alert rules define it: a message stored but whose ack and events could not be
handed to the broker (publishing raised) is counted in ``mqchat_messages_unpublished_total``.
A device still gets it from sync or catch-up, but not live.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from mqchat.core.protocol import ErrorEvent, Event

if TYPE_CHECKING:
    from mqchat.bridge.store import SendOutcome
    from mqchat.core.errors import ChatError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which ``generate_latest`` writes and every Prometheus 2.x reads."""

CONNACK_REASONS = {
    0: "accepted",
    1: "unacceptable_protocol_version",
    2: "identifier_rejected",
    3: "server_unavailable",
    4: "bad_username_or_password",
    5: "not_authorized",
}
"""MQTT 3.1.1 CONNACK return codes, as the ``reason`` label of ``mqchat_mqtt_connects_total``."""

COMMAND_TYPES = (
    "send_message",
    "send_group_message",
    "sync_messages",
    "ack",
    "mark_as_read",
    "recall_message",
    "typing",
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class _NodeLabelled:
    """A collector yielding another registry's metrics with ``node`` added to every sample."""

    def __init__(self, inner: CollectorRegistry, node: str) -> None:
        self._inner = inner
        self._node = node

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                if sample.name.endswith("_created") and family.type in ("counter", "histogram"):
                    continue
                labelled.add_sample(
                    sample.name, {"node": self._node, **sample.labels}, sample.value, sample.timestamp, sample.exemplar
                )
            yield labelled


class SendThreads(Protocol):
    """Where SQLite's send transactions ran (``SqliteDatabase``): counts since the start."""

    ran_here: int
    ran_on_writer: int
    moved: int


class _SendThreadsCollector:
    """Read at scrape time: counting them costs the hot path an integer increment."""

    def __init__(self, source: SendThreads) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        ran = CounterMetricFamily(
            "mqchat_send_transactions",
            "SQLite: transactions of sends, by the thread they ran on: the event loop's (small batches "
            "while its commits are quick) or the writer thread's (groups, large batches, after slow commits)",
            labels=["thread"],
        )
        ran.add_metric(["loop"], self._source.ran_here)
        ran.add_metric(["writer"], self._source.ran_on_writer)
        yield ran
        yield CounterMetricFamily(
            "mqchat_send_transactions_moved",
            "SQLite: times two slow commits (over 2 ms) among the last eight on the event loop's thread "
            "sent the next sends to the writer thread for 10 s: a slow or busy disk",
            value=self._source.moved,
        )


class BrokerStats(Protocol):
    """What the broker reports (``MqttServer.stats``)."""

    @property
    def stats(self) -> dict[str, int]: ...


class Metrics:
    def __init__(self, node: str = "local") -> None:
        self.node = node
        self._inner = CollectorRegistry()
        self.registry = CollectorRegistry()
        """What ``/metrics`` exposes."""
        self.registry.register(_NodeLabelled(self._inner, node))
        registry = self._inner
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)

        # ---- MQTT connections
        self._connects = Counter(
            "mqchat_mqtt_connects",
            "MQTT CONNECTs answered, by CONNACK return code (code) and its name (reason); 0 is accepted",
            ["code", "reason"],
            registry=registry,
        )
        for code, reason in CONNACK_REASONS.items():
            self._connects.labels(str(code), reason)
        self.connected_devices = Gauge(
            "mqchat_connected_devices", "Devices with a live, authenticated MQTT connection", registry=registry
        )
        self.mqtt_connections = Gauge(
            "mqchat_mqtt_connections", "Open MQTT connections, authenticated or not (all listeners)", registry=registry
        )
        self._slow_readers = Counter(
            "mqchat_slow_reader_disconnects",
            "Connections closed because they did not read what was sent to them (unsent bytes or "
            "unacknowledged QoS 1 deliveries over the limits); the device catches up when it reconnects",
            registry=registry,
        )

        # ---- commands and refusals
        self._commands = Counter(
            "mqchat_commands", "Commands received (MQTT and HTTP sends), by type", ["type"], registry=registry
        )
        self._command_children = {kind: self._commands.labels(kind) for kind in COMMAND_TYPES}
        self._refusals = Counter(
            "mqchat_refusals",
            "Errors answered to clients, by error code and transport (mqtt: an error event; http: an error response)",
            ["code", "via"],
            registry=registry,
        )

        # ---- storing and handing off
        self._stored = Counter(
            "mqchat_messages_stored", "Messages stored (a group message counts once)", registry=registry
        )
        self._duplicates = Counter(
            "mqchat_messages_duplicate",
            "Sends answered from the message already stored under their client_msg_id (retries)",
            registry=registry,
        )
        self._unpublished = Counter(
            "mqchat_messages_unpublished",
            "Messages stored whose ack and events could not be handed to the broker (publishing failed): "
            "not delivered live, only through sync and catch-up. Any increase is loss for live delivery",
            registry=registry,
        )
        self._batch_size = Histogram(
            "mqchat_commit_batch_size", "Sends stored per group commit", buckets=_BATCH_BUCKETS, registry=registry
        )
        self._batch_seconds = Histogram(
            "mqchat_commit_duration_seconds",
            "Time to store one group-commit batch (one transaction)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._latency = Histogram(
            "mqchat_send_latency_seconds",
            "Server time of a send: from its receipt (the PUBLISH reaching the chat service, or the HTTP "
            "request) to the hand-off of its ack and stream events to the broker",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.send_queue_depth = Gauge(
            "mqchat_send_queue_depth", "Sends waiting to be stored (the bridge queue)", registry=registry
        )
        self.send_queue_capacity = Gauge(
            "mqchat_send_queue_capacity",
            "Size of the bridge queue (bridge.queue_size); beyond it sends get server_busy",
            registry=registry,
        )
        self.long_polls = Gauge("mqchat_long_polls_waiting", "HTTP long-polls waiting for an event", registry=registry)

        # ---- dependencies
        self._database_up = Gauge(
            "mqchat_database_up",
            "1 if the last health write to the database committed within database.health_timeout_seconds",
            registry=registry,
        )
        self._database_check = Gauge(
            "mqchat_database_health_check_seconds",
            "Duration of the last health write (up to the timeout)",
            registry=registry,
        )
        self._redis_up: Gauge | None = None

    # ------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """The Prometheus text format of everything this node exports."""
        return generate_latest(self.registry)

    # ---------------------------------------------------------------- broker

    def watch_broker(self, broker: BrokerStats) -> None:
        """Read the broker's connection counts when scraped."""
        self.connected_devices.set_function(lambda: broker.stats["devices"])
        self.mqtt_connections.set_function(lambda: broker.stats["connections"])

    def connect_answered(self, code: int) -> None:
        self._connects.labels(str(code), CONNACK_REASONS.get(code, "other")).inc()

    def slow_reader_dropped(self) -> None:
        self._slow_readers.inc()

    # ------------------------------------------------------------------ chat

    def watch_send_threads(self, source: SendThreads) -> None:
        """SQLite only: which thread the send transactions ran on (PostgreSQL has no such choice)."""
        self._inner.register(_SendThreadsCollector(source))

    def watch_chat(self, queue_depth: Callable[[], int], queue_capacity: int, long_polls: Callable[[], int]) -> None:
        self.send_queue_depth.set_function(queue_depth)
        self.send_queue_capacity.set(queue_capacity)
        self.long_polls.set_function(long_polls)

    def command(self, kind: str) -> None:
        child = self._command_children.get(kind)
        (child if child is not None else self._commands.labels(kind)).inc()

    def replied(self, event: Event) -> None:
        """An event going to one device: an error is a refusal."""
        if isinstance(event, ErrorEvent):
            self._refusals.labels(event.code, "mqtt").inc()

    def refused(self, code: str, via: str) -> None:
        self._refusals.labels(code, via).inc()

    @contextmanager
    def committing(self, batch_size: int) -> Iterator[None]:
        """Around the store call of one group commit."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._batch_seconds.observe(time.perf_counter() - started)
            self._batch_size.observe(batch_size)

    def handed_off(self, accepted: Sequence[float], outcomes: Sequence[SendOutcome | ChatError]) -> None:
        """A batch's acks and events were handed to the broker; ``accepted``: the
        ``time.perf_counter()`` of each send's receipt."""
        now = time.perf_counter()
        for started, outcome in zip(accepted, outcomes, strict=True):
            if isinstance(outcome, Exception):
                continue
            self._latency.observe(now - started)
            (self._duplicates if outcome.duplicate else self._stored).inc()

    def unpublished(self, outcomes: Sequence[SendOutcome | ChatError]) -> None:
        """A batch was stored but handing it to the broker failed."""
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                continue
            if outcome.duplicate:
                self._duplicates.inc()
            else:
                self._stored.inc()
                self._unpublished.inc()

    # ---------------------------------------------------------- dependencies

    def database_checked(self, up: bool, seconds: float) -> None:
        self._database_up.set(1 if up else 0)
        self._database_check.set(seconds)

    def redis_checked(self, up: bool) -> None:
        """For cluster mode: ``mqchat_redis_up`` exists from its first report on."""
        if self._redis_up is None:
            self._redis_up = Gauge(
                "mqchat_redis_up", "1 if the node's Redis connection works (cluster mode)", registry=self._inner
            )
        self._redis_up.set(1 if up else 0)
