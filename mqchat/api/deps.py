"""The dependencies routes share: the running server's ``Services`` and the caller's token."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mqchat.bridge.auth import Claims
from mqchat.bridge.composition import Services
from mqchat.core.errors import NotAuthorized

_bearer = HTTPBearer(auto_error=False, description="An access token from POST /v1/token")

BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
"""The bearer credentials as sent, unchecked (``/metrics`` compares them with its own token)."""


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


async def _current_claims(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Claims:
    """A valid token: signed, unexpired, and not issued before its device was revoked."""
    if credentials is None:
        raise NotAuthorized("missing bearer token")
    return await services.accounts.authorize(credentials.credentials)


ClaimsDep = Annotated[Claims, Depends(_current_claims)]


def _current_user(claims: ClaimsDep) -> str:
    return claims.user_id


UserDep = Annotated[str, Depends(_current_user)]
