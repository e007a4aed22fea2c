"""Accounts and access tokens.

Passwords are hashed with argon2id (in a worker thread: a hash takes tens of
milliseconds of CPU and must not stall the event loop). Access tokens are HS256
JWTs carrying the user id and an expiry, signed with the server's secret.
"""

from __future__ import annotations

import asyncio
import time

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mqchat.bridge.store import MessageStore
from mqchat.core.errors import InvalidCommand, InvalidCredentials, InvalidToken
from mqchat.core.ids import check_id

MIN_PASSWORD = 8
MAX_PASSWORD = 256
_ALGORITHM = "HS256"
_AUDIENCE = "mqchat"


class TokenIssuer:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds

    def issue(self, user_id: str, ttl_seconds: int | None = None) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "iat": now, "exp": now + (ttl_seconds or self.ttl_seconds), "aud": _AUDIENCE}
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> str:
        """Return the user id the token was issued to, or raise ``InvalidToken``."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[_ALGORITHM], audience=_AUDIENCE, options={"require": ["sub", "exp"]}
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the access token has expired") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("the access token is not valid") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str):
            raise InvalidToken("the access token has no user")
        return subject


class Accounts:
    def __init__(self, store: MessageStore, tokens: TokenIssuer) -> None:
        self._store = store
        self._tokens = tokens
        self._hasher = PasswordHasher()

    @property
    def tokens(self) -> TokenIssuer:
        return self._tokens

    async def register(self, user_id: str, password: str) -> None:
        check_id(user_id, "user_id")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise InvalidCommand(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        digest = await asyncio.to_thread(self._hasher.hash, password)
        await self._store.create_user(user_id, digest)

    async def login(self, user_id: str, password: str) -> str:
        """Check the password and return a fresh access token."""
        digest = await self._store.get_password_hash(user_id)
        # An unknown user costs the same hash as a wrong password, so timing does not
        # reveal which user ids exist.
        ok = await asyncio.to_thread(self._verify, digest, password)
        if not ok:
            raise InvalidCredentials("wrong user id or password")
        return self._tokens.issue(user_id)

    def _verify(self, digest: str | None, password: str) -> bool:
        try:
            if digest is None:
                self._hasher.hash(password)
                return False
            return bool(self._hasher.verify(digest, password))
        except (VerificationError, InvalidHashError):
            return False
