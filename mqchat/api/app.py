"""The FastAPI application. ``create_app`` receives the running server's ``Services``."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from mqchat import __version__
from mqchat.api.admin import install_admin_routes
from mqchat.api.deps import BearerDep, ClaimsDep, ServicesDep, UserDep
from mqchat.api.errors import install_error_handlers
from mqchat.api.files import MULTIPART_OVERHEAD, UPLOAD_PATH, install_file_routes
from mqchat.api.headers import SecurityHeaders
from mqchat.api.limits import BodySizeLimit
from mqchat.api.requestid import RequestId
from mqchat.api.schemas import (
    ClientConfig,
    ConversationList,
    ConversationPublic,
    GroupCreate,
    GroupList,
    GroupPublic,
    Health,
    HistoryPage,
    MemberAdd,
    MessagePublic,
    PasswordChange,
    ReadBody,
    ReceiptList,
    ReceiptPublic,
    Registration,
    SendBody,
    Token,
    TokenRequest,
    UserPublic,
)
from mqchat.bridge.composition import Services
from mqchat.bridge.metrics import CONTENT_TYPE
from mqchat.core.errors import NotAuthorized, NotFound, UnknownUser
from mqchat.core.ids import ConversationId, DeviceAddress, check_id, is_valid_id
from mqchat.core.origin import encode_key
from mqchat.core.protocol import SYNC_DEFAULT_LIMIT, SYNC_MAX_LIMIT, MessageAck, Presence, SyncResponse

HISTORY_MAX_LIMIT = 200
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mqchat API</title>
<link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css">
<link rel="icon" type="image/png" href="/static/vendor/swagger-ui/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/static/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script>
</body>
</html>
"""
STATIC_DIR = Path(__file__).parent / "static"
"""The browser page: index.html, app.js, app.css and the vendored MQTT.js (docs/clients.md)."""
SinceSeq = Annotated[int, Query(ge=0, le=2**62)]
# Ids are 64-bit in the database: a larger number must be a 422, not a driver overflow (500).
MessageId = Annotated[int, PathParam(ge=1, le=2**62)]


def _token(services: Services, access: str, user_id: str, device_id: str | None) -> Token:
    key = encode_key(services.event_keys.key_for(user_id))
    return Token(access_token=access, expires_in=services.tokens.ttl_seconds, device_id=device_id, event_key=key)


def create_app(services: Services, client_config: ClientConfig | None = None) -> FastAPI:
    """``client_config``: the WebSocket ports the broker really bound (default: the configured ones)."""
    app = FastAPI(
        title="mqchat",
        version=__version__,
        description="HTTP face of mqchat. The MQTT protocol is in docs/protocol.md.",
        # FastAPI's own /docs and /redoc load their scripts from a CDN: /docs is served below
        # from the vendored Swagger UI instead, so it works without internet.
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    install_error_handlers(app)
    settings = services.settings
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.limits.http_max_body_bytes,
        timeout=settings.http.body_timeout_seconds,
        streamed={UPLOAD_PATH: settings.files.max_bytes + MULTIPART_OVERHEAD},
    )

    web_config = (client_config or ClientConfig.of(settings)).model_copy(
        update={
            "recall_window_seconds": settings.bridge.recall_window_seconds,
            "max_file_bytes": settings.files.max_bytes,
        }
    )
    # Added last, so outermost: the 413 and 408 of BodySizeLimit get the headers too.
    app.add_middleware(SecurityHeaders, client_config=web_config)
    # Outermost: everything logged while handling a request carries its id.
    app.add_middleware(RequestId)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI, from the package (static/vendor/swagger-ui, vendored by scripts/build-web.sh)."""
        return HTMLResponse(DOCS_PAGE, headers={"Cache-Control": "no-cache"})

    @app.get("/v1/client-config", tags=["ops"])
    async def client_config_route() -> ClientConfig:
        """Where the browser page finds the broker: MQTT over WebSocket on this host."""
        return web_config

    @app.get(
        "/healthz",
        tags=["ops"],
        response_model_exclude_none=True,
        responses={503: {"model": Health, "description": "Cannot store messages"}},
    )
    async def healthz(services: ServicesDep, response: Response) -> Health:
        """200 while the database takes a write (a tiny transaction) within
        ``database.health_timeout_seconds``; otherwise 503 with a machine-readable ``reason``. In
        cluster mode ``redis`` tells whether live delivery across nodes works (``degraded``, still
        200, when it does not)."""
        report = await services.health.check()
        redis = services.health.redis
        response.headers["Cache-Control"] = "no-store"
        if report.ok:
            # Redis down alone is not a reason to take the node out of a load balancer: every node
            # would be taken out at once, and each still stores and acks every message.
            return Health(status="degraded" if redis == "unavailable" else "ok", redis=redis)
        response.status_code = 503
        return Health(
            status="unavailable", database="unavailable", redis=redis, reason=report.reason, detail=report.detail
        )

    if settings.metrics.token is not None:
        _install_metrics_route(app, settings.metrics.token)

    @app.post(
        "/v1/users",
        status_code=201,
        tags=["accounts"],
        responses={403: {"description": "Registration closed"}, 429: {"description": "Too many registrations"}},
    )
    async def register(body: Registration, request: Request, services: ServicesDep) -> UserPublic:
        """Create an account, as ``auth.registration`` allows: 403 ``registration_closed`` when
        closed or without the right ``registration_token``; 429 ``rate_limited`` beyond
        ``auth.registrations_per_ip_per_hour`` from one address. A user id that differs only in
        case from an existing one is taken (409 ``user_exists``)."""
        client_ip = request.client.host if request.client else None
        await services.accounts.sign_up(
            body.user_id, body.password, client_ip=client_ip, registration_token=body.registration_token
        )
        return UserPublic(user_id=body.user_id)

    @app.post("/v1/token", tags=["accounts"], responses={429: {"description": "Too many failed logins"}})
    async def token(body: TokenRequest, request: Request, services: ServicesDep) -> Token:
        """Log in. Optionally scoped to one ``device_id``. Failed logins are throttled per
        user id and per client address: 429 ``rate_limited`` with ``retry_after``."""
        client_ip = request.client.host if request.client else None
        access = await services.accounts.login(
            body.user_id, body.password, client_ip=client_ip, device_id=body.device_id
        )
        return _token(services, access, body.user_id, body.device_id)

    @app.post("/v1/token/refresh", tags=["accounts"])
    async def refresh(claims: ClaimsDep, services: ServicesDep) -> Token:
        """A fresh token for the same user and device scope, from a valid one."""
        access = services.accounts.refresh(claims)
        return _token(services, access, claims.user_id, claims.device_id)

    @app.get("/v1/event-key", tags=["accounts"])
    async def event_key(claims: ClaimsDep, services: ServicesDep) -> dict[str, str]:
        """The user's event key (as in ``POST /v1/token``), for a client that holds only a token."""
        return {"event_key": encode_key(services.event_keys.key_for(claims.user_id))}

    @app.delete("/v1/devices/{device_id}", status_code=204, tags=["accounts"])
    async def revoke_device(device_id: str, user: UserDep, services: ServicesDep) -> Response:
        """Revoke one of your devices: its live MQTT connection is closed at once, and every
        token issued before now is refused for it (MQTT and HTTP). Logging in again issues
        fresh tokens."""
        check_id(device_id, "device_id")
        await services.accounts.revoke_device(user, device_id)
        await services.chat.close_device(DeviceAddress(user, device_id))
        return Response(status_code=204)

    @app.post("/v1/logout-all", status_code=204, tags=["accounts"])
    async def logout_all(user: UserDep, services: ServicesDep) -> Response:
        """Log out everywhere: every token of yours issued before now is refused (MQTT and HTTP,
        refresh included) and your live MQTT connections are closed. Log in again for a new one."""
        await services.accounts.log_out_everywhere(user)
        await services.chat.close_user(user)
        return Response(status_code=204)

    @app.post("/v1/password", tags=["accounts"], responses={429: {"description": "Too many failed attempts"}})
    async def change_password(
        body: PasswordChange, claims: ClaimsDep, request: Request, services: ServicesDep
    ) -> Token:
        """Change your password, given the current one (throttled like a login). Every token
        issued before now is refused and your live MQTT connections are closed; the answer
        carries a fresh token with the same device scope as the one used."""
        client_ip = request.client.host if request.client else None
        access = await services.accounts.change_password(
            claims, body.old_password, body.new_password, client_ip=client_ip
        )
        await services.chat.close_user(claims.user_id)
        return _token(services, access, claims.user_id, claims.device_id)

    @app.post("/v1/messages", tags=["messages"], responses={429: {"description": "Sending too fast"}})
    async def send(body: SendBody, claims: ClaimsDep, services: ServicesDep) -> MessageAck:
        """Same contract as ``send_message`` / ``send_group_message``: idempotent on ``client_msg_id``.
        Rate-limited like MQTT sends (per device for a device token): 429 ``rate_limited``."""
        return await services.chat.send(claims.user_id, body.command(), device_id=claims.device_id)

    @app.post("/v1/messages/{message_id}/recall", status_code=204, tags=["messages"])
    async def recall(message_id: MessageId, user: UserDep, services: ServicesDep) -> Response:
        """The sender, within the recall window, turns the message into a tombstone."""
        await services.chat.recall(user, message_id)
        return Response(status_code=204)

    @app.get("/v1/messages/{message_id}/receipts", tags=["messages"])
    async def receipts(message_id: MessageId, user: UserDep, services: ServicesDep) -> ReceiptList:
        """Who has the message delivered and read; for the people in its conversation."""
        found = await services.store.receipts(user, message_id)
        return ReceiptList(message_id=message_id, receipts=[ReceiptPublic.of(r) for r in found])

    # Stream events look the same over HTTP as over MQTT: absent optional fields, not nulls.
    @app.get("/v1/sync", tags=["sync"], response_model_exclude_none=True)
    async def sync(
        user: UserDep,
        services: ServicesDep,
        since_seq: SinceSeq = 0,
        limit: Annotated[int, Query(ge=1, le=SYNC_MAX_LIMIT)] = SYNC_DEFAULT_LIMIT,
    ) -> SyncResponse:
        return await services.chat.sync(user, since_seq, limit)

    @app.get("/v1/sync/long-poll", tags=["sync"], response_model_exclude_none=True)
    async def long_poll(
        user: UserDep,
        services: ServicesDep,
        since_seq: SinceSeq = 0,
        timeout: Annotated[float, Query(ge=0, le=60)] = 30,  # noqa: ASYNC109 (the API parameter name)
        limit: Annotated[int, Query(ge=1, le=SYNC_MAX_LIMIT)] = SYNC_DEFAULT_LIMIT,
    ) -> SyncResponse:
        """Answers as soon as the stream has an event after ``since_seq``, or empty at the timeout."""
        wait = min(timeout, services.settings.http.long_poll_max_seconds)
        return await services.chat.long_poll(user, since_seq, wait, limit)

    @app.get("/v1/conversations", tags=["history"])
    async def conversations(
        user: UserDep, services: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
    ) -> ConversationList:
        summaries = await services.store.conversations(user, limit)
        return ConversationList(conversations=[ConversationPublic.of(s) for s in summaries])

    @app.get("/v1/conversations/{conversation_id}/messages", tags=["history"])
    async def history(
        conversation_id: str,
        user: UserDep,
        services: ServicesDep,
        before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
        limit: Annotated[int, Query(ge=1, le=HISTORY_MAX_LIMIT)] = 50,
    ) -> HistoryPage:
        """A page of the conversation, newest first."""
        page = await services.store.history(user, ConversationId.parse(conversation_id), before_id, limit)
        next_before = page[-1].id if len(page) == limit else None
        return HistoryPage(
            conversation_id=conversation_id, messages=[MessagePublic.of(m) for m in page], next_before_id=next_before
        )

    @app.post("/v1/conversations/{conversation_id}/read", status_code=204, tags=["history"])
    async def mark_read(conversation_id: str, body: ReadBody, user: UserDep, services: ServicesDep) -> Response:
        """Marks ``message_id`` and everything before it in the conversation read."""
        found = await services.store.history(user, ConversationId.parse(conversation_id), body.message_id + 1, 1)
        if not found or found[0].id != body.message_id:
            raise NotFound(f"message {body.message_id} is not in {conversation_id}")
        await services.chat.mark_read(user, body.message_id)
        return Response(status_code=204)

    @app.get("/v1/users/{user_id}", tags=["accounts"], responses={404: {"description": "No such user"}})
    async def user_exists(user_id: str, user: UserDep, services: ServicesDep) -> UserPublic:
        """Whether ``user_id`` is a registered user (404 ``unknown_user`` if not): a client checks
        it before it opens a chat, rather than learn it from the first send."""
        if not is_valid_id(user_id) or await services.store.get_password_hash(user_id) is None:
            raise UnknownUser(f"no such user {user_id!r}")
        return UserPublic(user_id=user_id)

    @app.get("/v1/users/{user_id}/presence", tags=["presence"])
    async def presence(user_id: str, user: UserDep, services: ServicesDep) -> Presence:
        """For users who share a conversation or a group with ``user_id``."""
        return await services.chat.presence_of(user, user_id)

    _install_group_routes(app)
    install_admin_routes(app)
    install_file_routes(app)
    return app


def _metrics_response(services: Services) -> Response:
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


def _install_metrics_route(app: FastAPI, token: str) -> None:
    expected = token.encode()

    @app.get("/metrics", include_in_schema=False)
    async def metrics(services: ServicesDep, credentials: BearerDep) -> Response:
        """Prometheus text format, for requests bearing ``metrics.token``."""
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise NotAuthorized("/metrics needs the bearer token of metrics.token")
        return _metrics_response(services)


def create_metrics_app(services: Services) -> FastAPI:
    """The ``metrics.port`` listener: ``GET /metrics`` and nothing else, without a token (bind it
    to loopback or a private interface: ``metrics.host``)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return _metrics_response(services)

    return app


def _install_group_routes(app: FastAPI) -> None:
    @app.post("/v1/groups", status_code=201, tags=["groups"])
    async def create_group(body: GroupCreate, user: UserDep, services: ServicesDep) -> GroupPublic:
        """The creator becomes the owner and a member."""
        return GroupPublic.of(await services.chat.create_group(user, body.name, body.members))

    @app.get("/v1/groups", tags=["groups"])
    async def my_groups(user: UserDep, services: ServicesDep) -> GroupList:
        return GroupList(groups=[GroupPublic.of(g) for g in await services.store.groups_of(user)])

    @app.get("/v1/groups/{group_id}", tags=["groups"])
    async def get_group(group_id: str, user: UserDep, services: ServicesDep) -> GroupPublic:
        """Members only."""
        return GroupPublic.of(await services.chat.group_for(user, group_id))

    @app.post("/v1/groups/{group_id}/members", status_code=204, tags=["groups"])
    async def add_member(group_id: str, body: MemberAdd, user: UserDep, services: ServicesDep) -> Response:
        """The owner adds a member."""
        await services.chat.add_member(group_id, user, body.user_id)
        return Response(status_code=204)

    @app.delete("/v1/groups/{group_id}/members/{user_id}", status_code=204, tags=["groups"])
    async def remove_member(group_id: str, user_id: str, user: UserDep, services: ServicesDep) -> Response:
        """The owner removes a member; a member removes itself to leave."""
        await services.chat.remove_member(group_id, user, user_id)
        return Response(status_code=204)
