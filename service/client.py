"""Python client for the attention service (CONTRACT §2–§4), sync and async, over httpx.

    from service.client import AttentionClient
    with AttentionClient("http://127.0.0.1:8000") as client:
        result = client.attention(q, k, v, {"type": "sliding_window", "window": 128}, return_lse=True)
        result.output, result.lse, result.meta["timing_ms"]

Inputs are numpy arrays or torch tensors (float32, float16, and bfloat16 as torch tensors);
they travel as base64 of their little-endian bytes unless `encoding="data"` asks for JSON
lists or `encoding="binary"` for raw bytes after a JSON header (`service.binary`, the fastest
for large tensors). 429 and 503 answers are retried after their Retry-After, a bounded number
of times; every other failure raises an `AttentionError` subclass carrying the service's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, get_args

import httpx
import numpy as np
import pybase64
import torch

from . import binary
from .middleware import REQUEST_ID
from .wire import DTYPE_NAMES, DTYPES, STORAGE, Encoding, encoding_problem, tensor_bytes, tensor_object, tensor_of

RETRYABLE_STATUSES = frozenset({429, 503})


# ---------------------------------------------------------------------------------------- errors


class AttentionError(Exception):
    """A request the service did not answer with a result: `status` is the HTTP status (None
    when no answer came back), `field` the request field the service blamed, if it named one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        field: str | None = None,
        request_id: str | None = None,
        body: Any = None,
    ):
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.message = message
        self.status = status
        self.field = field
        self.request_id = request_id
        self.body = body


class InvalidRequestError(AttentionError):
    """4xx: the request itself is wrong (422 malformed, wrong shape, dtype, pattern...)."""


class AuthenticationError(InvalidRequestError):
    """401/403: no valid `Authorization: Bearer` key."""


class PayloadTooLargeError(InvalidRequestError):
    """413: the body, or the work it asks for, is over the service's limits."""


class OverloadedError(AttentionError):
    """429 (queue full) or 503 (not ready, shutting down), still so after the allowed retries."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class DeadlineExceededError(AttentionError):
    """504: the request's deadline passed before it could run."""


class ServerError(AttentionError):
    """5xx other than 503 and 504: the service failed."""


class TransportError(AttentionError):
    """No HTTP answer: the connection failed or the client's timeout expired (`status` None)."""


def error_for(response: httpx.Response) -> AttentionError:
    """The typed error for a non-2xx response, with the service's message and field."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    message, field_name = _message_and_field(body)
    status = response.status_code
    kwargs = {"status": status, "field": field_name, "request_id": response.headers.get("x-request-id"), "body": body}
    if status in RETRYABLE_STATUSES:
        return OverloadedError(message, retry_after=retry_after_seconds(response), **kwargs)
    if status == 504:
        return DeadlineExceededError(message, **kwargs)
    if status in (401, 403):
        return AuthenticationError(message, **kwargs)
    if status == 413:
        return PayloadTooLargeError(message, **kwargs)
    if 400 <= status < 500:
        return InvalidRequestError(message, **kwargs)
    return ServerError(message, **kwargs)


def _message_and_field(body: Any) -> tuple[str, str | None]:
    """The message and the blamed field of the contract's error body `{"error": {"message",
    "field"}}` (the service's and its nginx's); any other body (a proxy's page) is the message."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        field_name = error.get("field")
        return error["message"], field_name if isinstance(field_name, str) else None
    text = body if isinstance(body, str) else json.dumps(body)
    return text.strip() or "no message", None


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds, from either of its forms (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # asctime's form and "-0000" name no zone: HTTP dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# ------------------------------------------------------------------------------ tensors on the wire


def encode_tensor(name: str, x: Any, encoding: Encoding = "b64") -> dict[str, Any]:
    """The contract's tensor object for a numpy array or torch tensor (for "binary", its size:
    the bytes, `raw_bytes(x)`, travel after the JSON)."""
    x, dtype = _wire_tensor(name, x)
    if encoding not in get_args(Encoding):
        raise ValueError(f"encoding: {encoding!r} is not 'b64', 'data' or 'binary'")
    problem = encoding_problem(dtype, encoding)
    if problem:
        raise ValueError(f"{name}: {problem} (CONTRACT §2)")
    if encoding == "data" and not bool(torch.isfinite(x).all()):  # JSON has no NaN or Inf to send
        raise ValueError(f"{name}: values must be finite (no NaN or Inf)")
    return tensor_object(x, encoding)


def raw_bytes(x: Any) -> memoryview:
    """The little-endian C-order bytes of a numpy array or torch tensor."""
    return memoryview(tensor_bytes(_wire_tensor("tensor", x)[0]))


def _wire_tensor(name: str, x: Any) -> tuple[torch.Tensor, str]:
    """A contiguous CPU tensor and its dtype's name; refuses anything else."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    dtype = DTYPE_NAMES.get(x.dtype)
    if dtype is None:
        raise ValueError(f"{name}: dtype {x.dtype} is not one of {', '.join(DTYPES)}; cast it first")
    return x.detach().cpu().contiguous(), dtype


def decode_tensor(name: str, tensor: dict[str, Any], raw: memoryview | None = None) -> torch.Tensor:
    """A torch tensor from the contract's tensor object (any encoding; `raw`: a binary tensor's bytes)."""
    try:
        shape, dtype = [int(n) for n in tensor["shape"]], tensor["dtype"]
        storage = STORAGE[dtype]
    except (KeyError, TypeError, ValueError) as exc:
        raise AttentionError(f"{name}: the response's tensor is malformed: {exc!r}") from exc
    if tensor.get("b64") is not None or raw is not None:
        try:
            data = raw if raw is not None else pybase64.b64decode(tensor["b64"])
            values = np.frombuffer(data, dtype=storage).reshape(shape)
        except ValueError as exc:
            raise AttentionError(f"{name}: the response's bytes do not fit shape {shape}: {exc}") from exc
        return tensor_of(values.copy(), dtype)  # a copy: writable, not tied to the response's buffer
    data = tensor.get("data")
    if data is None:
        raise AttentionError(f"{name}: the response's tensor has none of 'b64', 'data' or 'binary_data_size'")
    # JSON has no infinities: a row with no key has an lse of -inf, which may arrive as null
    values = [float("-inf") if x is None else x for x in data] if None in data else data
    return torch.tensor(values, dtype=torch.float32).reshape(shape).to(DTYPES[dtype])


@dataclass(frozen=True)
class AttentionResult:
    """One answer: the output [B, H, Lq, Dv] in q's dtype, the float32 lse [B, H, Lq] when it
    was asked for, and the service's `meta` (timing, batch, memory, backend...)."""

    output: torch.Tensor
    lse: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None


def build_request(
    q: Any,
    k: Any,
    v: Any,
    pattern: dict[str, Any] | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    encoding: Encoding = "b64",
    response_encoding: Encoding | None = None,
    timeout_ms: float | None = None,
) -> dict[str, Any]:
    """The POST /attention body for these inputs (CONTRACT §2)."""
    body: dict[str, Any] = {
        "q": encode_tensor("q", q, encoding),
        "k": encode_tensor("k", k, encoding),
        "v": encode_tensor("v", v, encoding),
        "pattern": pattern if pattern is not None else {"type": "dense"},
        "causal": causal,
        "scale": None if scale is None else float(scale),  # numpy's scalars are no JSON
        "return_lse": return_lse,
    }
    if response_encoding is not None:
        body["encoding"] = response_encoding
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    return body


def parse_response(response: httpx.Response) -> AttentionResult:
    """The result of a 2xx response (JSON, or binary), or the typed error of any other."""
    if not response.is_success:
        raise error_for(response)
    raw: dict[str, memoryview] = {}
    if response.headers.get("content-type", "").startswith(binary.MEDIA_TYPE):
        try:
            header, tensors = binary.split(response.content, response.headers.get(binary.HEADER))
        except binary.BinaryBodyError as exc:
            raise AttentionError(f"the binary response does not parse: {exc}") from exc
        body = json.loads(bytes(header))
        at = 0
        for name in ("output", "lse"):
            if body.get(name) is not None:
                size = int(body[name]["binary_data_size"])
                raw[name], at = tensors[at : at + size], at + size
    else:
        body = response.json()
    lse = body.get("lse")
    return AttentionResult(
        output=decode_tensor("output", body["output"], raw.get("output")),
        lse=decode_tensor("lse", lse, raw.get("lse")) if lse is not None else None,
        meta=body.get("meta") or {},
        request_id=response.headers.get("x-request-id"),
    )


# ----------------------------------------------------------------------------------------- clients


class _ClientSettings:
    """What the sync and async clients share: endpoint, auth, retry policy, request building."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        encoding: Encoding,
    ):
        if max_retries < 0:
            raise ValueError("max_retries: must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.encoding: Encoding = encoding
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _post_args(self, args: tuple, kwargs: dict, request_id: str | None) -> dict[str, Any]:
        kwargs.setdefault("encoding", self.encoding)
        # One id for every attempt of this call (the caller's, else a new one), so that the
        # service's logs and answers tie the retries together.
        if request_id is not None and not REQUEST_ID.fullmatch(request_id):
            raise ValueError(f"request_id: {request_id!r} is not 1 to 1024 characters of visible ASCII with inner "
                             "spaces, which the service would replace")
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id or uuid.uuid4().hex}
        content = json.dumps(build_request(*args, **kwargs), allow_nan=False).encode()
        if kwargs["encoding"] == "binary":
            content, extra = binary.join(content, [raw_bytes(x) for x in args[:3]])
            headers.update({"Content-Type": binary.MEDIA_TYPE, **extra})
        return {"url": "/attention", "content": content, "headers": headers}

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when this answer is final."""
        if response.status_code not in RETRYABLE_STATUSES or attempt >= self.max_retries:
            return None
        after = retry_after_seconds(response)
        return min(self.max_backoff_s, after if after is not None else self.backoff_s * 2**attempt)


def _transport_error(exc: httpx.HTTPError, request_id: str | None) -> TransportError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return TransportError(f"the request {kind}: {type(exc).__name__}: {exc}", request_id=request_id)


class AttentionClient(_ClientSettings):
    """Blocking client. `http` lets a caller bring its own httpx.Client (e.g. a Starlette
    TestClient around the app); otherwise one is made for `base_url` and closed by `close()`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        encoding: Encoding = "b64",
        http: httpx.Client | None = None,
    ):
        super().__init__(
            base_url,
            api_key=api_key,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            encoding=encoding,
        )
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(base_url=self.base_url, timeout=timeout)
        self._http.headers.update(self.headers)

    def attention(self, q, k, v, pattern=None, *, request_id: str | None = None, **options) -> AttentionResult:
        """POST /attention. Options: causal, scale, return_lse, encoding (of the inputs),
        response_encoding, timeout_ms (the service-side deadline)."""
        post = self._post_args((q, k, v, pattern), options, request_id)
        attempt = 0
        while True:
            try:
                response = self._http.post(**post)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, post["headers"]["X-Request-ID"]) from exc
            delay = self._retry_delay(response, attempt)
            if delay is None:
                return parse_response(response)
            time.sleep(delay)
            attempt += 1

    def ready(self) -> bool:
        """True when GET /readyz answers 200 (the engine is loaded and warm)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        """Block until /readyz answers 200; TransportError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TransportError(f"{self.base_url} was not ready within {timeout_s} s")
            time.sleep(poll_s)

    def patterns(self) -> Any:
        """GET /patterns: every pattern type with its parameters and rule."""
        response = self._http.get("/patterns")
        if not response.is_success:
            raise error_for(response)
        return response.json()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> AttentionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncAttentionClient(_ClientSettings):
    """The same client for asyncio. `http` may be an httpx.AsyncClient of the caller's (e.g.
    over httpx.ASGITransport(app)); `limits` sizes the connection pool of the one made here."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        encoding: Encoding = "b64",
        http: httpx.AsyncClient | None = None,
        limits: httpx.Limits | None = None,
    ):
        super().__init__(
            base_url,
            api_key=api_key,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            encoding=encoding,
        )
        self._owns_http = http is None
        self._http = (
            http
            if http is not None
            else httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits or httpx.Limits())
        )
        self._http.headers.update(self.headers)

    async def attention(self, q, k, v, pattern=None, *, request_id: str | None = None, **options) -> AttentionResult:
        """POST /attention; the same options as `AttentionClient.attention`."""
        post = self._post_args((q, k, v, pattern), options, request_id)
        attempt = 0
        while True:
            try:
                response = await self._http.post(**post)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, post["headers"]["X-Request-ID"]) from exc
            delay = self._retry_delay(response, attempt)
            if delay is None:
                return parse_response(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def ready(self) -> bool:
        """True when GET /readyz answers 200."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        """Wait until /readyz answers 200; TransportError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise TransportError(f"{self.base_url} was not ready within {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def patterns(self) -> Any:
        """GET /patterns."""
        response = await self._http.get("/patterns")
        if not response.is_success:
            raise error_for(response)
        return response.json()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncAttentionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
