"""The FastAPI application. ``create_app`` receives the running server's ``Services``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mqchat import __version__
from mqchat.api.errors import install_error_handlers
from mqchat.api.schemas import (
    ConversationList,
    ConversationPublic,
    Credentials,
    Health,
    HistoryPage,
    MessagePublic,
    ReceiptList,
    ReceiptPublic,
    SendBody,
    Token,
    UserPublic,
)
from mqchat.bridge.services import Services
from mqchat.core.errors import InvalidCommand, NotAuthorized
from mqchat.core.ids import is_valid_id
from mqchat.core.protocol import SYNC_DEFAULT_LIMIT, SYNC_MAX_LIMIT, MessageAck, SyncResponse

HISTORY_MAX_LIMIT = 200
_bearer = HTTPBearer(auto_error=False, description="An access token from POST /v1/token")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


def _current_user(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    if credentials is None:
        raise NotAuthorized("missing bearer token")
    return services.tokens.verify(credentials.credentials)


UserDep = Annotated[str, Depends(_current_user)]
SinceSeq = Annotated[int, Query(ge=0, le=2**62)]


def _checked_conversation(conversation_id: str) -> str:
    kind, _, ident = conversation_id.partition(":")
    if kind not in ("user", "group") or not is_valid_id(ident):
        raise InvalidCommand("conversation_id must be 'user:{user_id}' or 'group:{group_id}'")
    return conversation_id


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="mqchat",
        version=__version__,
        description="HTTP face of mqchat. The MQTT protocol is in docs/protocol.md.",
    )
    app.state.services = services
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz(services: ServicesDep) -> Health:
        await services.store.ping()
        return Health()

    @app.post("/v1/users", status_code=201, tags=["accounts"])
    async def register(body: Credentials, services: ServicesDep) -> UserPublic:
        await services.accounts.register(body.user_id, body.password)
        return UserPublic(user_id=body.user_id)

    @app.post("/v1/token", tags=["accounts"])
    async def token(body: Credentials, services: ServicesDep) -> Token:
        access = await services.accounts.login(body.user_id, body.password)
        return Token(access_token=access, expires_in=services.tokens.ttl_seconds)

    @app.post("/v1/messages", tags=["messages"])
    async def send(body: SendBody, user: UserDep, services: ServicesDep) -> MessageAck:
        """Same contract as ``send_message`` / ``send_group_message``: idempotent on ``client_msg_id``."""
        return await services.chat.send(user, body.command())

    @app.post("/v1/messages/{message_id}/recall", status_code=204, tags=["messages"])
    async def recall(message_id: int, user: UserDep, services: ServicesDep) -> Response:
        """The sender, within the recall window, turns the message into a tombstone."""
        await services.chat.recall(user, message_id)
        return Response(status_code=204)

    @app.get("/v1/messages/{message_id}/receipts", tags=["messages"])
    async def receipts(message_id: int, user: UserDep, services: ServicesDep) -> ReceiptList:
        """Who has the message delivered and read; for the people in its conversation."""
        found = await services.store.receipts(user, message_id)
        return ReceiptList(message_id=message_id, receipts=[ReceiptPublic.of(r) for r in found])

    @app.get("/v1/sync", tags=["sync"])
    async def sync(
        user: UserDep,
        services: ServicesDep,
        since_seq: SinceSeq = 0,
        limit: Annotated[int, Query(ge=1, le=SYNC_MAX_LIMIT)] = SYNC_DEFAULT_LIMIT,
    ) -> SyncResponse:
        return await services.chat.sync(user, since_seq, limit)

    @app.get("/v1/sync/long-poll", tags=["sync"])
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
        before_id: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=HISTORY_MAX_LIMIT)] = 50,
    ) -> HistoryPage:
        """A page of the conversation, newest first."""
        page = await services.store.history(user, _checked_conversation(conversation_id), before_id, limit)
        next_before = page[-1].id if len(page) == limit else None
        return HistoryPage(
            conversation_id=conversation_id, messages=[MessagePublic.of(m) for m in page], next_before_id=next_before
        )

    return app
