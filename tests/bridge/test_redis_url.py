"""``redis_url``: the plain and the Sentinel forms, read and checked without any server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio.sentinel import SentinelConnectionPool

from mqchat.bridge.redis_client import PlainTarget, RedisUrlError, SentinelTarget, connect, parse_redis_url
from mqchat.config import Settings


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:secret@redis.example:6380/2", "unix:///run/redis.sock", "REDIS://h/0"],
)
def test_plain_urls_are_left_to_redis_py(url: str) -> None:
    assert parse_redis_url(url) == PlainTarget(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://h1:26379,h2:26380,h3/mymaster",
            SentinelTarget((("h1", 26379), ("h2", 26380), ("h3", 26379)), "mymaster"),
        ),
        (
            "redis+sentinel://:p%40ss@10.0.0.1:5000/chat/3",
            SentinelTarget((("10.0.0.1", 5000),), "chat", db=3, password="p@ss"),
        ),
        ("redis+sentinel://h1,[::1]:26380/svc", SentinelTarget((("h1", 26379), ("::1", 26380)), "svc")),
        (
            "redis+sentinel://app:pw@[::1]:26379,[fe80::2]/svc/0?sentinel_password=s3&sentinel_username=sent",
            SentinelTarget(
                (("::1", 26379), ("fe80::2", 26379)),
                "svc",
                0,
                "app",
                "pw",
                sentinel_username="sent",
                sentinel_password="s3",
            ),
        ),
    ],
)
def test_sentinel_urls(url: str, expected: SentinelTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:6379", "no scheme"),
        ("http://h:6379/0", "unknown scheme http"),
        ("rediss+sentinel://h1/svc", "TLS through Sentinel"),
        ("redis+sentinel://h1:26379,h2:26379", "needs the service name"),
        ("redis+sentinel://h1:26379/", "needs the service name"),
        ("redis+sentinel:///svc", "empty Sentinel address"),
        ("redis+sentinel://h1,,h2/svc", "empty Sentinel address"),
        ("redis+sentinel://h1:port/svc", "port of Sentinel h1 must be a number"),
        ("redis+sentinel://h1:0/svc", "must be 1-65535"),
        ("redis+sentinel://h1:70000/svc", "must be 1-65535"),
        ("redis+sentinel://::1:26379/svc", "expected host:port"),
        ("redis+sentinel://[::1/svc", "IPv6"),
        ("redis+sentinel://h1/svc/x", "database number must be a number"),
        ("redis+sentinel://h1/svc/-1", "database number must be a number"),
        ("redis+sentinel://h1/svc/0/extra", "only a database number may follow"),
        ("redis+sentinel://h1/svc/", "only a database number may follow"),
        ("redis+sentinel://h1/svc?sentinel_pasword=x", "unknown option"),
        ("redis+sentinel://h1/svc?sentinel_password=a&sentinel_password=b", "more than once"),
        ("redis+sentinel://h1/svc#frag", "fragment"),
        ("redis+sentinel://h1/svc?sentinel_password", "cannot read the URL's options"),
    ],
)
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(RedisUrlError, match=problem):
        parse_redis_url(url)


def test_errors_never_repeat_the_password() -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url("redis+sentinel://user:hunter2@h1:bad/svc?sentinel_password=hunter3")
    assert "hunter" not in str(caught.value)


def test_settings_refuse_a_bad_url_at_start_up() -> None:
    with pytest.raises(ValidationError, match=r"(?s)redis_url.*needs the service name"):
        Settings.load(redis_url="redis+sentinel://h1:26379")
    assert Settings.load(redis_url="redis+sentinel://h1/svc").redis_url == "redis+sentinel://h1/svc"


async def test_a_sentinel_url_gives_a_client_that_asks_the_sentinels_for_the_master() -> None:
    client = connect("redis+sentinel://app:pw@h1:1,h2:2/svc/4?sentinel_password=s", timeout=1.5)
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert (pool.service_name, pool.is_master) == ("svc", True)
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == (4, "app", "pw", 1.5)
        sentinels = pool.sentinel_manager.sentinels
        addresses = [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in sentinels
        ]
        assert addresses == [("h1", 1), ("h2", 2)]
        assert sentinels[0].connection_pool.connection_kwargs["password"] == "s"
    finally:
        await client.aclose()
