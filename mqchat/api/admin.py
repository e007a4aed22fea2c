"""The administration routes, ``/v1/admin/...``: for tokens of users whose role is ``admin``.

The role is not in the token: ``Accounts.authorize`` reads it from the database at each
request, with the revocation check it makes anyway, so promoting or demoting someone takes
effect at their next request (docs/operations.md, "Admin").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, StringConstraints

from mqchat.bridge.auth import MAX_PASSWORD, MIN_PASSWORD, Claims
from mqchat.bridge.composition import Services
from mqchat.bridge.store import GroupSummary, UserRecord
from mqchat.core.errors import AdminOnly, InvalidCommand, NotAllowed, NotAuthorized
from mqchat.core.ids import ID_PATTERN, is_valid_id
from mqchat.core.protocol import format_time

_bearer = HTTPBearer(auto_error=False, description="An access token of an administrator")
AfterId = Annotated[str, Query(max_length=64, pattern=f"^({ID_PATTERN})?$")]
PageLimit = Annotated[int, Query(ge=1, le=1000)]


class AdminContext:
    def __init__(self, services: Services, claims: Claims) -> None:
        self.services = services
        self.claims = claims

    @property
    def admin(self) -> str:
        return self.claims.user_id


async def _admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> AdminContext:
    services: Services = request.app.state.services
    if credentials is None:
        raise NotAuthorized("missing bearer token")
    claims = await services.accounts.authorize(credentials.credentials)
    if claims.role != "admin":
        raise AdminOnly("administrators only")
    return AdminContext(services, claims)


AdminDep = Annotated[AdminContext, Depends(_admin)]


class UserAdminView(BaseModel):
    user_id: str
    role: str
    status: str
    created_at: str
    disabled_at: str | None
    deleted_at: str | None
    last_seq: int
    """The head of the user's stream: how many events it ever had."""
    connected_devices: list[str]
    """Device ids of the user connected over MQTT to the node that answers."""

    @classmethod
    def of(cls, record: UserRecord, devices: list[str]) -> UserAdminView:
        return cls(
            user_id=record.user_id,
            role=record.role,
            status=record.status,
            created_at=format_time(record.created_at),
            disabled_at=_ms(record.disabled_at_ms),
            deleted_at=_ms(record.deleted_at_ms),
            last_seq=record.last_seq,
            connected_devices=devices,
        )


class UserAdminList(BaseModel):
    users: list[UserAdminView]
    next_after: str | None
    """Pass as ``after`` for the next page; null on the last one."""


class GroupAdminView(BaseModel):
    group_id: str
    name: str
    owner: str
    member_count: int
    created_at: str

    @classmethod
    def of(cls, group: GroupSummary) -> GroupAdminView:
        return cls(
            group_id=group.group_id,
            name=group.name,
            owner=group.owner,
            member_count=group.members,
            created_at=format_time(group.created_at),
        )


class GroupAdminList(BaseModel):
    groups: list[GroupAdminView]
    next_after: str | None


class GroupAdminDetail(BaseModel):
    group_id: str
    name: str
    owner: str
    members: list[str]
    created_at: str


class NewPassword(BaseModel):
    password: Annotated[str, StringConstraints(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]


def _ms(value: int | None) -> str | None:
    return None if value is None else format_time(datetime.fromtimestamp(value / 1000, UTC))


def _user_id(user_id: str) -> str:
    if not is_valid_id(user_id):
        raise InvalidCommand("user_id must match [A-Za-z0-9_.-]{1,64}")
    return user_id


def _not_yourself(context: AdminContext, user_id: str, what: str) -> None:
    # Locking oneself out over HTTP is one click; the command line can still do it on purpose.
    if user_id == context.admin:
        raise NotAllowed(f"administrators cannot {what} their own account over HTTP (mqchat user {what} can)")


def install_admin_routes(app: FastAPI) -> None:
    @app.get("/v1/admin/users", tags=["admin"])
    async def list_users(
        context: AdminDep, after: AfterId = "", limit: PageLimit = 100, include_deleted: bool = False
    ) -> UserAdminList:
        """Accounts by user id, ``limit`` at a time after ``after``."""
        found = await context.services.ops.admin.list_users(after, limit, include_deleted=include_deleted)
        presence = context.services.chat.presence
        return UserAdminList(
            users=[UserAdminView.of(r, presence.devices_of(r.user_id)) for r in found],
            next_after=found[-1].user_id if len(found) == limit else None,
        )

    @app.get("/v1/admin/users/{user_id}", tags=["admin"])
    async def get_user(user_id: str, context: AdminDep) -> UserAdminView:
        record = await context.services.ops.admin.user(_user_id(user_id))
        return UserAdminView.of(record, context.services.chat.presence.devices_of(record.user_id))

    @app.post("/v1/admin/users/{user_id}/disable", status_code=204, tags=["admin"])
    async def disable(user_id: str, context: AdminDep) -> Response:
        """Refuse the user's logins and tokens from now on; their connections are closed."""
        _not_yourself(context, _user_id(user_id), "disable")
        await context.services.ops.admin.disable(user_id)
        return Response(status_code=204)

    @app.post("/v1/admin/users/{user_id}/enable", status_code=204, tags=["admin"])
    async def enable(user_id: str, context: AdminDep) -> Response:
        """The user may log in again (tokens from before the disabling stay refused)."""
        await context.services.ops.admin.enable(_user_id(user_id))
        return Response(status_code=204)

    @app.post("/v1/admin/users/{user_id}/password", status_code=204, tags=["admin"])
    async def set_password(user_id: str, body: NewPassword, context: AdminDep) -> Response:
        """Set the password; every earlier token of the user is refused, their connections closed."""
        await context.services.ops.admin.set_password(_user_id(user_id), body.password)
        return Response(status_code=204)

    @app.delete("/v1/admin/users/{user_id}", status_code=204, tags=["admin"])
    async def delete_user(user_id: str, context: AdminDep) -> Response:
        """Delete the account (docs/operations.md says what goes and what stays)."""
        _not_yourself(context, _user_id(user_id), "delete")
        await context.services.ops.admin.delete(user_id)
        return Response(status_code=204)

    @app.get("/v1/admin/groups", tags=["admin"])
    async def list_groups(context: AdminDep, after: AfterId = "", limit: PageLimit = 100) -> GroupAdminList:
        found = await context.services.ops.admin.list_groups(after, limit)
        return GroupAdminList(
            groups=[GroupAdminView.of(g) for g in found],
            next_after=found[-1].group_id if len(found) == limit else None,
        )

    @app.get("/v1/admin/groups/{group_id}", tags=["admin"])
    async def get_group(group_id: str, context: AdminDep) -> GroupAdminDetail:
        if not is_valid_id(group_id):
            raise InvalidCommand("group_id must match [A-Za-z0-9_.-]{1,64}")
        group = await context.services.ops.admin.group(group_id)
        return GroupAdminDetail(
            group_id=group.group_id,
            name=group.name,
            owner=group.owner,
            members=list(group.members),
            created_at=format_time(group.created_at),
        )
