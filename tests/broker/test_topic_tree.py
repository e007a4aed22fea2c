"""The topic tree answers exactly what amqtt's own per-filter ``Broker._matches`` answers."""

from __future__ import annotations

import logging

from amqtt.broker import Broker
from hypothesis import given
from hypothesis import strategies as st

from mqchat.broker.topic_tree import TopicTree, matches

# Few distinct level names, so that random topics and filters collide often.
_LEVELS = st.sampled_from(["a", "b", "", "$SYS", "$x", "c d"])
_TOPICS = st.lists(_LEVELS, min_size=1, max_size=4).map("/".join)


@st.composite
def _filters(draw: st.DrawFn) -> str:
    """Valid MQTT filters: ``+`` fills a whole level, ``#`` only the whole last level."""
    levels = draw(st.lists(st.one_of(_LEVELS, st.just("+")), min_size=0, max_size=4))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


class _Amqtt:
    """Just enough of a ``Broker`` for its ``_matches`` method."""

    logger = logging.getLogger("test_topic_tree")


def amqtt_matches(topic: str, topic_filter: str) -> bool:
    return bool(Broker._matches(_Amqtt(), topic, topic_filter))  # type: ignore[arg-type]


@given(st.sets(_filters() | _TOPICS, max_size=12), st.lists(_TOPICS, min_size=1, max_size=6))
def test_match_agrees_with_amqtt(filters: set[str], topics: list[str]) -> None:
    tree: TopicTree[str] = TopicTree()
    for topic_filter in filters:
        tree[topic_filter] = topic_filter
    for topic in topics:
        assert sorted(tree.match(topic)) == sorted(f for f in filters if amqtt_matches(topic, f))


@given(st.sets(_filters() | _TOPICS, max_size=12), st.data())
def test_removal_leaves_exactly_the_rest(filters: set[str], data: st.DataObject) -> None:
    tree: TopicTree[str] = TopicTree()
    for topic_filter in filters:
        tree[topic_filter] = topic_filter
    removed = data.draw(st.sets(st.sampled_from(sorted(filters)))) if filters else set()
    for topic_filter in removed:
        del tree[topic_filter]
    kept = filters - removed
    assert len(tree) == len(kept)
    assert set(tree) == kept
    assert all((f in tree) == (f in kept) for f in filters)
    topic = data.draw(_TOPICS)
    assert sorted(tree.match(topic)) == sorted(f for f in kept if amqtt_matches(topic, f))


@given(_TOPICS, _filters() | _TOPICS)
def test_single_filter_helper_agrees_with_amqtt(topic: str, topic_filter: str) -> None:
    assert matches(topic, topic_filter) == amqtt_matches(topic, topic_filter)


def test_mqtt_examples() -> None:
    tree: TopicTree[int] = TopicTree()
    for value, topic_filter in enumerate(["sport/#", "sport/+", "+/+", "#", "+/monitor/Clients", "$SYS/#"]):
        tree[topic_filter] = value
    assert sorted(tree.match("sport")) == [0, 3]  # '#' also matches the parent level
    assert sorted(tree.match("sport/tennis")) == [0, 1, 2, 3]
    assert sorted(tree.match("/finance")) == [2, 3]  # '+' matches the empty first level
    assert sorted(tree.match("$SYS/monitor/Clients")) == [5]  # no leading wildcard for $-topics


def test_values_are_replaced_and_removal_of_unknown_filters_raises() -> None:
    tree: TopicTree[int] = TopicTree()
    tree["a/+"] = 1
    tree["a/+"] = 2
    tree["a/b"] = 3
    assert len(tree) == 2
    assert tree.get("a/+") == 2
    assert sorted(tree.match("a/b")) == [2, 3]
    for missing in ("a/#", "a/+/c", "x"):
        try:
            del tree[missing]
        except KeyError:
            continue
        raise AssertionError(f"deleting {missing!r} should raise KeyError")
    del tree["a/+"]
    assert tree.match("a/b") == [3]
    assert list(tree) == ["a/b"]
