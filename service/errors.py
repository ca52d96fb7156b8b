"""Every error answers with the same JSON body (CONTRACT §3), naming the field when one applies.

    {"error": {"status": 422, "field": "k.shape", "message": "k.shape: ...", "errors": [...]}}

Validation failures list each problem in `errors`; the first is the `field` and `message`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from engine.batcher import ClientGone, OutOfMemory, QueueFull, ShuttingDown
from engine.patterns import echo_of_bad_members, error_field, error_reason

from .schemas import TOO_LARGE, ErrorDetail, ErrorResponse

log = logging.getLogger("service")

# 499: the client closed the request (nginx's code); nobody is left to read it. Out of memory is
# 503 with Retry-After: the service is overloaded for this request now, not refusing it for good.
# A passed deadline is not here: the route answers it, with the 504 naming the request's timeout_ms.
_BATCHER_STATUS = {QueueFull: 429, ShuttingDown: 503, OutOfMemory: 503, ClientGone: 499}


class ApiError(HTTPException):
    """An error answer: status, the field at fault (or None), a message, extra headers."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.field = field


def error_body(status: int, field: str | None, message: str,
               errors: list[dict[str, str]] | None = None) -> ErrorResponse:
    """The contract's error body; `errors` defaults to this one error where a field applies."""
    errors = errors or ([{"field": field, "message": message}] if field else [])
    return ErrorResponse(error=ErrorDetail(status=status, field=field, message=message, errors=errors))


def error_response(
    request: Request, status: int, field: str | None, message: str,
    headers: dict[str, str] | None = None, errors: list[dict[str, str]] | None = None,
) -> JSONResponse:
    body = error_body(status, field, message, errors)
    headers = dict(headers or {})
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_and_reason(error: dict) -> tuple[str, str]:
    """('pattern.patterns[0].stride', what was wrong) from a pydantic error: its location plus the
    `field` a validator named (`schemas.field_error`), and that validator's reason or pydantic's."""
    ctx = error.get("ctx") or {}
    loc = [p for p in error["loc"] if p != "body"] + ([ctx["field"]] if "field" in ctx else [])
    return error_field(loc) or "body", ctx.get("reason") or error_reason(error)


def _routing_error(request: Request, exc: HTTPException) -> JSONResponse:
    """The router's own errors, which say only "Not Found" and "Method Not Allowed", naming the path
    or the methods the path takes (all of them: Starlette's Allow names one route's, not HEAD's)."""
    path = request.url.path
    if exc.status_code == 404:
        return error_response(request, 404, "path", f"path: {path!r} is not a route of this service (see /docs)")
    if exc.status_code == 405:
        methods = ", ".join(sorted({method for route in request.app.routes if getattr(route, "path", None) == path
                                    for method in getattr(route, "methods", ())}))
        return error_response(request, 405, "method", f"method: {request.method} is not allowed on {path}; it takes "
                                                      f"{methods}", {"Allow": methods})
    return error_response(request, exc.status_code, None, str(exc.detail), exc.headers)


def validation_response(request: Request, exc: ValidationError | RequestValidationError) -> JSONResponse:
    """422 naming each field, in its message too, or 413 when the request is valid but over a
    configured limit."""
    raw = [e for e in (exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc.errors())
           if not echo_of_bad_members(e)]
    errors = [{"field": field, "message": f"{field}: {reason}"} for field, reason in map(_field_and_reason, raw)]
    status = 413 if any(e["type"] == TOO_LARGE for e in raw) else 422
    first = errors[0]
    return error_response(request, status, first["field"], first["message"], errors=errors)


def install(app: FastAPI, retry_after: dict[str, str]) -> None:
    """Register the handlers that turn every failure into the contract's error body; 429 and 503
    carry the `retry_after` header."""

    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: ValidationError | RequestValidationError) -> JSONResponse:
        return validation_response(request, exc)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:  # mid-body: no server fault
        return error_response(request, 499, None, "the client disconnected before its request arrived")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return error_response(request, exc.status_code, exc.field, str(exc.detail), exc.headers)
        return _routing_error(request, exc)

    for kind, status in _BATCHER_STATUS.items():

        async def _batcher(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return error_response(request, status, None, str(exc), retry_after if status in (429, 503) else None)

        app.add_exception_handler(kind, _batcher)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        # The server closes the connection after this answer (starlette re-raises the error):
        # saying so keeps a client from sending its next request into the closed connection.
        return error_response(request, 500, None, f"internal error: {type(exc).__name__}", {"Connection": "close"})
