"""Accounts, access tokens, revocation, and the throttles of logins and registrations.

Passwords are hashed with argon2id (in a worker thread: a hash takes tens of
milliseconds of CPU and must not stall the event loop), a bounded number at once
(``HashingGate``). Access tokens are HS256
JWTs carrying the user id, an expiry, the issue time in milliseconds and, when the
token was asked for one device, that device (``dev``). A device-scoped token is
accepted only for that device's MQTT client id. Revoking a device refuses every
token issued before the revocation when it is used for that device, whether the
token was scoped to it or not (an unscoped token could otherwise reconnect it).
Logging out everywhere (or changing the password) refuses every token of the user
issued before it, on any device.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mqchat.bridge.cluster import Degraded, RedisCluster
from mqchat.bridge.store import AccountStore
from mqchat.config import AuthSettings
from mqchat.core.errors import (
    AccountDisabled,
    ChatError,
    InvalidCommand,
    InvalidCredentials,
    InvalidToken,
    RateLimited,
    RegistrationClosed,
    ServerBusy,
    UnknownUser,
)
from mqchat.core.ids import check_id
from mqchat.core.origin import event_key, sign

MIN_PASSWORD = 8
MAX_PASSWORD = 256
_ALGORITHM = "HS256"
_AUDIENCE = "mqchat"
_T = TypeVar("_T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified access token says."""

    user_id: str
    device_id: str | None
    """The one device the token is for; None: any device of the user."""
    issued_ms: int
    role: str = "user"
    """Not from the token: what the database says at ``Accounts.authorize`` (``user`` or ``admin``)."""


class TokenIssuer:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds

    def issue(self, user_id: str, ttl_seconds: int | None = None, *, device_id: str | None = None) -> str:
        issued = now_ms()
        now = issued // 1000
        claims: dict[str, object] = {
            "sub": user_id,
            "iat": now,
            # JWT's iat has whole seconds; revocation compares milliseconds so that a
            # token from a login right after a revocation is not refused with it.
            "iat_ms": issued,
            "exp": now + (ttl_seconds or self.ttl_seconds),
            "aud": _AUDIENCE,
        }
        if device_id is not None:
            claims["dev"] = check_id(device_id, "device_id")
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Claims:
        """Check signature, audience and expiry; raise ``InvalidToken`` otherwise."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[_ALGORITHM], audience=_AUDIENCE, options={"require": ["sub", "exp"]}
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the access token has expired") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("the access token is not valid") from exc
        subject, device = claims.get("sub"), claims.get("dev")
        if not isinstance(subject, str) or not (device is None or isinstance(device, str)):
            raise InvalidToken("the access token has no user")
        issued = claims.get("iat_ms")
        if not isinstance(issued, int):
            # A token from before iat_ms existed: assume the start of its second, which
            # errs towards refusing it after a revocation in that second.
            iat = claims.get("iat")
            issued = int(iat) * 1000 if isinstance(iat, int) else 0
        return Claims(subject, device, issued)


class EventKeys:
    """Signs the events of each user's stream and device topics (``mqchat.core.origin``).

    The keys derive from the server secret, so every node of a cluster signs alike."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        # One key per user, derived once: a group message is signed once per member stream.
        self.key_for = functools.lru_cache(maxsize=65_536)(self._derive)

    def _derive(self, user_id: str) -> bytes:
        return event_key(self._secret, user_id)

    def sign(self, user_id: str, payload: bytes) -> bytes:
        return sign(self.key_for(user_id), payload)


class SlidingWindow:
    """Events per key within a sliding window of ``window`` seconds, at most ``limit`` each.

    Memory is bounded: at most ``max_keys`` keys are remembered, the least recently used
    go first."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self._limit = limit
        self._window = window
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._max_keys = max_keys

    def wait(self, key: str, now: float) -> float:
        """Seconds until one more event for ``key`` fits; 0 if it fits now."""
        events = self._events.get(key)
        if events is None:
            return 0.0
        while events and events[0] <= now - self._window:
            events.popleft()
        if len(events) < self._limit:
            return 0.0
        # Allowed again when enough of the oldest events have left the window.
        return events[len(events) - self._limit] + self._window - now

    def add(self, key: str, now: float) -> None:
        events = self._events.pop(key, None) or deque(maxlen=self._limit)
        events.append(now)
        self._events[key] = events  # re-inserted: most recent last
        while len(self._events) > self._max_keys:
            self._events.popitem(last=False)

    def discard(self, key: str, stamp: float) -> None:
        """Forget one event (a reservation that turned out not to count)."""
        events = self._events.get(key)
        if events is not None and stamp in events:
            events.remove(stamp)

    def clear(self, key: str) -> None:
        self._events.pop(key, None)


class LoginThrottle:
    """Failed logins per user id and per client address in a sliding window.

    An attempt is counted **before** the password is hashed (``reserve``), as if it were
    going to fail: 60 concurrent guesses then get at most ``login_max_failures`` hashes,
    the rest 429 at once. A success takes its reservation back and clears the user id's
    failures (not the address's others). A throttled attacker learns nothing more.
    """

    def __init__(self, settings: AuthSettings, max_keys: int = 100_000) -> None:
        window = settings.login_window_seconds
        self._user = SlidingWindow(settings.login_max_failures, window, max_keys)
        self._ip = SlidingWindow(settings.login_max_failures_per_ip, window, max_keys)
        self._signups: SlidingWindow | None = None

    async def reserve(self, user_id: str, client_ip: str | None) -> float:
        """Count an attempt, or raise ``RateLimited``; returns the reservation's stamp."""
        now = time.monotonic()
        wait = max(self._user.wait(user_id, now), self._ip.wait(client_ip, now) if client_ip else 0.0)
        if wait > 0:
            raise RateLimited("too many failed logins; try again later", retry_after=wait)
        self._user.add(user_id, now)
        if client_ip:
            self._ip.add(client_ip, now)
        return now

    async def succeeded(self, user_id: str, client_ip: str | None, stamp: float) -> None:
        self._user.clear(user_id)
        if client_ip:
            self._ip.discard(client_ip, stamp)

    async def release(self, user_id: str, client_ip: str | None, stamp: float) -> None:
        """Take back a reservation whose password was never checked (the server was busy or
        the database failed): it is not a failed guess."""
        self._user.discard(user_id, stamp)
        if client_ip:
            self._ip.discard(client_ip, stamp)

    async def registration(self, client_ip: str, limit: int) -> None:
        """Count a registration from ``client_ip`` (``limit`` an hour), or raise ``RateLimited``."""
        now = time.monotonic()
        wait = self._registrations(limit).wait(client_ip, now)
        if wait > 0:
            raise RateLimited("too many registrations from your address; try again later", retry_after=wait)
        self._registrations(limit).add(client_ip, now)

    def _registrations(self, limit: int) -> SlidingWindow:
        if self._signups is None:
            self._signups = SlidingWindow(limit, 3600)
        return self._signups


class ClusterLoginThrottle:
    """The same counts across every node of a cluster, in Redis (atomic, counted before the
    hash); this node's own counts while Redis cannot answer."""

    def __init__(self, cluster: RedisCluster, settings: AuthSettings) -> None:
        self._cluster = cluster
        self._settings = settings
        self._local = LoginThrottle(settings)
        self._stamps = itertools.count()

    def _limits(self, user_id: str, client_ip: str | None) -> list[tuple[str, int]]:
        limits = [(f"login:u:{user_id}", self._settings.login_max_failures)]
        if client_ip:
            limits.append((f"login:ip:{client_ip}", self._settings.login_max_failures_per_ip))
        return limits

    async def reserve(self, user_id: str, client_ip: str | None) -> float:
        stamp = float(next(self._stamps))
        try:
            wait = await self._cluster.count_attempt(
                self._limits(user_id, client_ip), self._settings.login_window_seconds, self._member(stamp)
            )
        except Degraded:
            return -1 - await self._local.reserve(user_id, client_ip)  # negative: a local reservation
        if wait > 0:
            raise RateLimited("too many failed logins; try again later", retry_after=wait)
        return stamp

    async def succeeded(self, user_id: str, client_ip: str | None, stamp: float) -> None:
        if stamp < 0:
            await self._local.succeeded(user_id, client_ip, -1 - stamp)
            return
        await self._cluster.forget_attempt([f"login:u:{user_id}"], None)
        if client_ip:
            await self._cluster.forget_attempt([f"login:ip:{client_ip}"], self._member(stamp))

    async def release(self, user_id: str, client_ip: str | None, stamp: float) -> None:
        if stamp < 0:
            await self._local.release(user_id, client_ip, -1 - stamp)
            return
        await self._cluster.forget_attempt([key for key, _ in self._limits(user_id, client_ip)], self._member(stamp))

    async def registration(self, client_ip: str, limit: int) -> None:
        try:
            wait = await self._cluster.count_attempt([(f"signup:ip:{client_ip}", limit)], 3600, secrets.token_hex(8))
        except Degraded:
            await self._local.registration(client_ip, limit)
            return
        if wait > 0:
            raise RateLimited("too many registrations from your address; try again later", retry_after=wait)

    def _member(self, stamp: float) -> str:
        return f"{self._cluster.node_id}:{id(self)}:{int(stamp)}"


class HashingGate:
    """At most ``concurrency`` password hashes at once and ``queue`` waiting for a slot.

    argon2 costs tens of milliseconds of CPU: without a bound, a burst of logins queues
    hashes without end and a real login waits behind all of them (8 s behind 60 guesses).
    Beyond the queue the request is refused at once with ``server_busy``."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._capacity = concurrency + queue
        self._pending = 0

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._pending >= self._capacity:
            raise ServerBusy("too many password checks at once; try again in a moment")
        self._pending += 1
        try:
            async with self._slots:
                return await asyncio.to_thread(fn, *args)
        finally:
            self._pending -= 1


class Accounts:
    def __init__(
        self,
        store: AccountStore,
        tokens: TokenIssuer,
        settings: AuthSettings | None = None,
        cluster: RedisCluster | None = None,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._settings = settings or AuthSettings()
        self._hasher = PasswordHasher()
        # Login and registration attempts count across the cluster in cluster mode.
        self._throttle: LoginThrottle | ClusterLoginThrottle = (
            LoginThrottle(self._settings) if cluster is None else ClusterLoginThrottle(cluster, self._settings)
        )
        self._hashing = HashingGate(self._settings.password_hash_concurrency, self._settings.password_hash_queue)

    @property
    def tokens(self) -> TokenIssuer:
        return self._tokens

    async def register(self, user_id: str, password: str) -> None:
        """Create an account, whatever the registration policy (``mqchat user add``)."""
        check_id(user_id, "user_id")
        _check_password(password)
        digest = await self._hashing.run(self._hasher.hash, password)
        await self._store.create_user(user_id, digest)

    async def sign_up(
        self, user_id: str, password: str, *, client_ip: str | None, registration_token: str | None = None
    ) -> None:
        """``POST /v1/users``: ``register`` under ``auth.registration`` and the per-address limit."""
        policy = self._settings.registration
        if policy == "closed":
            raise RegistrationClosed("registration is closed on this server; ask its operator for an account")
        if policy == "token":
            expected = (self._settings.registration_token or "").encode()
            if registration_token is None or not hmac.compare_digest(registration_token.encode(), expected):
                raise RegistrationClosed("registration on this server needs a valid registration_token")
        check_id(user_id, "user_id")
        _check_password(password)
        if client_ip:
            # Counted before the hash, whatever the outcome: an attempt costs the hash.
            await self._throttle.registration(client_ip, self._settings.registrations_per_ip_per_hour)
        await self.register(user_id, password)

    async def login(
        self, user_id: str, password: str, *, client_ip: str | None = None, device_id: str | None = None
    ) -> str:
        """Check the password and return a fresh access token (for one device, if given)."""
        if device_id is not None:
            check_id(device_id, "device_id")
        await self._verify_login(user_id, password, client_ip)
        return self._tokens.issue(user_id, device_id=device_id)

    async def _verify_login(self, user_id: str, password: str, client_ip: str | None) -> None:
        stamp = await self._throttle.reserve(user_id, client_ip)
        try:
            digest = await self._store.get_password_hash(user_id)
            # An unknown user costs the same hash as a wrong password, so timing does not
            # reveal which user ids exist.
            ok = await self._hashing.run(self._verify, digest, password)
        except ChatError as exc:
            if exc.retryable:  # the server's trouble, not a failed login: it does not count
                await self._throttle.release(user_id, client_ip, stamp)
            raise
        if not ok:
            raise InvalidCredentials("wrong user id or password")
        await self._throttle.succeeded(user_id, client_ip, stamp)
        # Only someone who knows the password learns that the account is disabled.
        standing = await self._store.token_standing(user_id, None)
        if standing is not None and standing.disabled:
            raise AccountDisabled("this account is disabled; ask the server's operator")

    async def authorize(self, token: str, device_id: str | None = None) -> Claims:
        """Verify a token for use, on one device when ``device_id`` is given.

        Refused: a token scoped to another device, a token issued before the device (given,
        or the token's own) was revoked, one issued before the user logged out everywhere or
        changed the password, and every token of a deleted or disabled account. The returned
        claims carry the account's role as the database has it now.
        """
        claims = self._tokens.verify(token)
        if device_id is not None and claims.device_id not in (None, device_id):
            raise InvalidToken(f"the access token is for another device than {device_id!r}")
        device = device_id or claims.device_id
        standing = await self._store.token_standing(claims.user_id, device)
        if standing is None:
            raise InvalidToken("the access token's user does not exist")
        if standing.disabled:
            raise AccountDisabled("this account is disabled; ask the server's operator")
        if standing.refused_upto is not None and claims.issued_ms <= standing.refused_upto:
            raise InvalidToken("the access token was revoked; log in again")
        return replace(claims, role=standing.role)

    def refresh(self, claims: Claims) -> str:
        """A fresh token with the same user and device scope (``claims`` already authorized)."""
        return self._tokens.issue(claims.user_id, device_id=claims.device_id)

    async def revoke_device(self, user_id: str, device_id: str) -> None:
        check_id(device_id, "device_id")
        await self._store.revoke_device(user_id, device_id, now_ms())
        await _past_this_millisecond()

    async def log_out_everywhere(self, user_id: str) -> None:
        """Refuse every token of the user issued until now, on every device."""
        await self._store.revoke_all_tokens(user_id, now_ms())
        await _past_this_millisecond()

    async def change_password(self, claims: Claims, old: str, new: str, *, client_ip: str | None = None) -> str:
        """Replace the password (given the old one, throttled like a login), refuse every token
        issued until now, and return a fresh one with the caller's scope."""
        _check_password(new)
        await self._verify_login(claims.user_id, old, client_ip)
        digest = await self._hashing.run(self._hasher.hash, new)
        await self._store.set_password(claims.user_id, digest, now_ms())
        await _past_this_millisecond()
        return self.refresh(claims)

    async def reset_password(self, user_id: str, new: str) -> None:
        """An administrator sets the password (no old one asked); every earlier token is refused."""
        _check_password(new)
        if await self._store.get_password_hash(user_id) is None:
            raise UnknownUser(f"no such user {user_id!r}")
        digest = await self._hashing.run(self._hasher.hash, new)
        await self._store.set_password(user_id, digest, now_ms())
        await _past_this_millisecond()

    def _verify(self, digest: str | None, password: str) -> bool:
        try:
            if digest is None:
                self._hasher.hash(password)
                return False
            return bool(self._hasher.verify(digest, password))
        except (VerificationError, InvalidHashError):
            return False


def _check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidCommand(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")


async def _past_this_millisecond() -> None:
    # Let the clock pass the revocation's millisecond: a login right after it must get a
    # token that is strictly newer, or it would be refused with the old ones.
    await asyncio.sleep(0.002)
