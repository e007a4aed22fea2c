"""An index of MQTT topic filters (MQTT 3.1.1, section 4.7).

amqtt finds the subscribers of a message by testing the topic against every
subscribed filter, so each message costs time in proportion to the connected
devices. Here filters without wildcards sit in a dict (one lookup per message) and
filters with ``+`` or ``#`` in a trie keyed by level, so matching costs one dict
lookup plus a walk as deep as the topic, whatever the number of filters.

Semantics follow amqtt's ``Broker._matches``: ``+`` matches exactly one level
(an empty one too), ``#`` matches any number of levels including none (``a/#``
matches ``a``), and a topic starting with ``$`` is not matched by a filter whose
first level is a wildcard [MQTT-4.7.2-1]. Filters must already be valid
(amqtt's ``add_subscription`` refuses the others before they get here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

_SINGLE = "+"
_MULTI = "#"
_ABSENT = object()


def has_wildcard(topic_filter: str) -> bool:
    return _SINGLE in topic_filter or _MULTI in topic_filter


def matches(topic: str, topic_filter: str) -> bool:
    """Whether one filter matches one topic (for the rare scan, e.g. retained messages)."""
    tree: TopicTree[bool] = TopicTree()
    tree[topic_filter] = True
    return bool(tree.match(topic))


class _Node(Generic[V]):
    __slots__ = ("children", "filled", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.filled = False
        self.value: V | None = None


class TopicTree(Generic[V]):
    """A mapping from topic filter to a value, with ``match(topic)`` -> the values of every matching filter."""

    __slots__ = ("_exact", "_root", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, V] = {}
        self._root: _Node[V] = _Node()
        self._wild = 0

    def __len__(self) -> int:
        return len(self._exact) + self._wild

    def __contains__(self, topic_filter: object) -> bool:
        if not isinstance(topic_filter, str):
            return False
        if not has_wildcard(topic_filter):
            return topic_filter in self._exact
        return self._find(topic_filter) is not None

    def __iter__(self) -> Iterator[str]:
        yield from self._exact
        yield from _filters(self._root, [])

    def get(self, topic_filter: str) -> V | None:
        if not has_wildcard(topic_filter):
            return self._exact.get(topic_filter)
        node = self._find(topic_filter)
        return node.value if node is not None else None

    def __setitem__(self, topic_filter: str, value: V) -> None:
        if not has_wildcard(topic_filter):
            self._exact[topic_filter] = value
            return
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if not node.filled:
            self._wild += 1
        node.filled = True
        node.value = value

    def __delitem__(self, topic_filter: str) -> None:
        if not has_wildcard(topic_filter):
            del self._exact[topic_filter]
            return
        path = [self._root]
        levels = topic_filter.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                raise KeyError(topic_filter)
            path.append(child)
        leaf = path[-1]
        if not leaf.filled:
            raise KeyError(topic_filter)
        leaf.filled = False
        leaf.value = None
        self._wild -= 1
        _prune(path, levels)

    def match(self, topic: str) -> list[V]:
        """The values of all filters that match ``topic`` (one entry per matching filter)."""
        found: list[V] = []
        exact = self._exact.get(topic, _ABSENT)
        if exact is not _ABSENT:
            found.append(exact)  # type: ignore[arg-type]
        if self._wild:
            _walk(self._root, topic.split("/"), topic.startswith("$"), found)
        return found

    def _find(self, topic_filter: str) -> _Node[V] | None:
        """The trie node of a wildcard filter, if that filter is present."""
        node: _Node[V] | None = self._root
        for level in topic_filter.split("/"):
            node = node.children.get(level) if node is not None else None
        return node if node is not None and node.filled else None


def _walk(root: _Node[V], levels: list[str], dollar: bool, found: list[V]) -> None:
    """Depth-first over the nodes that can still match; iterative, no recursion limit."""
    depth = len(levels)
    stack = [(root, 0)]
    while stack:
        node, i = stack.pop()
        children = node.children
        # A wildcard in the first level never matches a $-topic [MQTT-4.7.2-1].
        wild_ok = not (dollar and i == 0)
        multi = children.get(_MULTI)
        if multi is not None and multi.filled and wild_ok:
            found.append(multi.value)  # type: ignore[arg-type]
        if i == depth:
            if node.filled:
                found.append(node.value)  # type: ignore[arg-type]
            continue
        single = children.get(_SINGLE)
        if single is not None and wild_ok:
            stack.append((single, i + 1))
        literal = children.get(levels[i])
        if literal is not None:
            stack.append((literal, i + 1))


def _prune(path: list[_Node[V]], levels: list[str]) -> None:
    """Drop the nodes a removal left without a value or children, from the leaf up."""
    for depth in range(len(levels), 0, -1):
        node = path[depth]
        if node.filled or node.children:
            return
        del path[depth - 1].children[levels[depth - 1]]


def _filters(node: _Node[V], prefix: list[str]) -> Iterator[str]:
    if node.filled:
        yield "/".join(prefix)
    for level, child in node.children.items():
        yield from _filters(child, [*prefix, level])
