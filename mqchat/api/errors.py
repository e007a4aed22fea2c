"""The one mapping from errors to HTTP responses: ``{"error": {"code", "message"}}``
(plus ``retry_after``, in seconds, with ``rate_limited``; ``oldest_seq`` and ``latest_seq``
with ``cursor_expired``)."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mqchat.core.errors import ChatError, CursorExpired, RateLimited

_HTTP_CODES = {
    400: "bad_request",
    401: "not_authorized",
    403: "not_allowed",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
}


def error_body(
    code: str, message: str, retry_after: float | None = None, **extra: int | None
) -> dict[str, dict[str, str | float]]:
    body: dict[str, str | float] = {"code": code, "message": message}
    if retry_after is not None:
        body["retry_after"] = retry_after
    body.update({name: value for name, value in extra.items() if value is not None})
    return {"error": body}


def _headers(exc: ChatError) -> dict[str, str] | None:
    if exc.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(math.ceil(exc.retry_after))}  # the header takes whole seconds
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChatError)
    async def _chat_error(request: Request, exc: ChatError) -> JSONResponse:
        request.app.state.services.metrics.refused(exc.code, "http")
        retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
        extra = {"oldest_seq": exc.oldest_seq, "latest_seq": exc.latest_seq} if isinstance(exc, CursorExpired) else {}
        return JSONResponse(
            error_body(exc.code, exc.message, retry_after, **extra), status_code=exc.status, headers=_headers(exc)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.app.state.services.metrics.refused("invalid_command", "http")
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
        return JSONResponse(error_body("invalid_command", f"{where}: {first.get('msg')}"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)
