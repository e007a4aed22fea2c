"""Accounts, access tokens, device revocation and login throttling.

Passwords are hashed with argon2id (in a worker thread: a hash takes tens of
milliseconds of CPU and must not stall the event loop). Access tokens are HS256
JWTs carrying the user id, an expiry, the issue time in milliseconds and, when the
token was asked for one device, that device (``dev``). A device-scoped token is
accepted only for that device's MQTT client id. Revoking a device refuses every
token issued before the revocation when it is used for that device, whether the
token was scoped to it or not (an unscoped token could otherwise reconnect it).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mqchat.bridge.store import MessageStore
from mqchat.config import AuthSettings
from mqchat.core.errors import InvalidCommand, InvalidCredentials, InvalidToken, RateLimited
from mqchat.core.ids import check_id
from mqchat.core.origin import event_key, sign

MIN_PASSWORD = 8
MAX_PASSWORD = 256
_ALGORITHM = "HS256"
_AUDIENCE = "mqchat"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified access token says."""

    user_id: str
    device_id: str | None
    """The one device the token is for; None: any device of the user."""
    issued_ms: int


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


class LoginThrottle:
    """Failed logins per user id and per client address in a sliding window.

    Checked before the password, so a throttled attacker learns nothing more; a
    success clears the user id's failures (not the address's). Memory is bounded:
    at most ``max_keys`` keys are remembered, the least recently failed go first.
    """

    def __init__(self, settings: AuthSettings, max_keys: int = 100_000) -> None:
        self._window = settings.login_window_seconds
        self._limits = {"user": settings.login_max_failures, "ip": settings.login_max_failures_per_ip}
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._max_keys = max_keys

    def _keys(self, user_id: str, client_ip: str | None) -> list[tuple[str, str]]:
        keys = [("user", user_id)]
        if client_ip:
            keys.append(("ip", client_ip))
        return keys

    def check(self, user_id: str, client_ip: str | None) -> None:
        """Raise ``RateLimited`` if this user id or address has failed too often lately."""
        now = time.monotonic()
        waits = [self._wait(key, now) for key in self._keys(user_id, client_ip)]
        wait = max(waits)
        if wait > 0:
            raise RateLimited("too many failed logins; try again later", retry_after=wait)

    def _wait(self, key: tuple[str, str], now: float) -> float:
        failures = self._failures.get(key)
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if len(failures) < self._limits[key[0]]:
            return 0.0
        # Allowed again when enough of the oldest failures have left the window.
        return failures[len(failures) - self._limits[key[0]]] + self._window - now

    def failed(self, user_id: str, client_ip: str | None) -> None:
        now = time.monotonic()
        for key in self._keys(user_id, client_ip):
            failures = self._failures.pop(key, None) or deque(maxlen=self._limits[key[0]])
            failures.append(now)
            self._failures[key] = failures  # re-inserted: most recent last
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, user_id: str) -> None:
        self._failures.pop(("user", user_id), None)


class Accounts:
    def __init__(self, store: MessageStore, tokens: TokenIssuer, settings: AuthSettings | None = None) -> None:
        self._store = store
        self._tokens = tokens
        self._hasher = PasswordHasher()
        self._throttle = LoginThrottle(settings or AuthSettings())

    @property
    def tokens(self) -> TokenIssuer:
        return self._tokens

    async def register(self, user_id: str, password: str) -> None:
        check_id(user_id, "user_id")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise InvalidCommand(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        digest = await asyncio.to_thread(self._hasher.hash, password)
        await self._store.create_user(user_id, digest)

    async def login(
        self, user_id: str, password: str, *, client_ip: str | None = None, device_id: str | None = None
    ) -> str:
        """Check the password and return a fresh access token (for one device, if given)."""
        self._throttle.check(user_id, client_ip)
        if device_id is not None:
            check_id(device_id, "device_id")
        digest = await self._store.get_password_hash(user_id)
        # An unknown user costs the same hash as a wrong password, so timing does not
        # reveal which user ids exist.
        ok = await asyncio.to_thread(self._verify, digest, password)
        if not ok:
            self._throttle.failed(user_id, client_ip)
            raise InvalidCredentials("wrong user id or password")
        self._throttle.succeeded(user_id)
        return self._tokens.issue(user_id, device_id=device_id)

    async def authorize(self, token: str, device_id: str | None = None) -> Claims:
        """Verify a token for use, on one device when ``device_id`` is given.

        Refused: a token scoped to another device, and a token issued before the device
        (given, or the token's own) was revoked.
        """
        claims = self._tokens.verify(token)
        if device_id is not None and claims.device_id not in (None, device_id):
            raise InvalidToken(f"the access token is for another device than {device_id!r}")
        device = device_id or claims.device_id
        if device is not None:
            revoked = await self._store.device_revoked_at(claims.user_id, device)
            if revoked is not None and claims.issued_ms <= revoked:
                raise InvalidToken(f"device {device!r} was revoked; log in again")
        return claims

    def refresh(self, claims: Claims) -> str:
        """A fresh token with the same user and device scope (``claims`` already authorized)."""
        return self._tokens.issue(claims.user_id, device_id=claims.device_id)

    async def revoke_device(self, user_id: str, device_id: str) -> None:
        check_id(device_id, "device_id")
        await self._store.revoke_device(user_id, device_id, now_ms())
        # Let the clock pass the revocation's millisecond: a login right after it must
        # get a token that is strictly newer, or it would be refused with the old ones.
        await asyncio.sleep(0.002)

    def _verify(self, digest: str | None, password: str) -> bool:
        try:
            if digest is None:
                self._hasher.hash(password)
                return False
            return bool(self._hasher.verify(digest, password))
        except (VerificationError, InvalidHashError):
            return False
