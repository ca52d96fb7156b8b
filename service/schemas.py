"""Request and response models of POST /attention (CONTRACT §2) and the error body (§3).

Validation runs in an order that keeps bad requests cheap: field types first, then the limits
(declared shapes against the configured token and element limits, 413, before anything is
allocated), then the cross-field shape rules, then each encoding's length against its shape,
and only then decoding, which is where non-finite values are found. A failure names its field
through `field_error`, whose `field` is relative to the model that raised it.
"""

from __future__ import annotations

import binascii
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pybase64
import torch
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, WithJsonSchema, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from engine.attention import effective_scale, float32_problem, shape_problem
from engine.patterns import Dense, Pattern, PatternBase, attended_pairs, attended_pairs_bound

from .wire import DTYPES, STORAGE, DTypeName, Encoding, encoding_problem, tensor_object, tensor_of

# A flat list in C order, or lists nested to the tensor's shape. Checked by numpy in
# `Tensor.decode`, not element by element by pydantic: a pydantic error per bad element lets a
# 10 MB body of strings take gigabytes of error objects.
Values = Annotated[
    list[Any],
    WithJsonSchema(
        {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "array"}]}},
    ),
]

_ENCODING_FIELDS = {"b64": "b64", "data": "data", "binary": "binary_data_size"}  # where each encoding's values are
TOO_LARGE = "too_large"  # the error type that answers 413 rather than 422
# Values an answer may carry as JSON numbers: ~JSON_NUMBER_BYTES of JSON and ~60 of Python objects each while
# it is built (2^22: 82 MB, 0.4 s); a small request asking a large output as `data` took 4.5 GB and 9 s.
MAX_DATA_VALUES = 1 << 22
JSON_NUMBER_BYTES = 20  # about, for a float32 value


def field_error(field: str, message: str, kind: str = "field_error") -> PydanticCustomError:
    """A validation error whose message and `ctx.field` name the offending field."""
    return PydanticCustomError(kind, "{field}: {reason}", {"field": field, "reason": message})


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; passed as validation context by the service."""

    max_tokens: int
    max_elements: int
    max_heads: int
    max_pairs: int  # (query, key) pairs over the batch and heads: the work one request may ask of the engine


class Tensor(BaseModel):
    """A tensor: its shape, dtype and exactly one of `data` (JSON numbers), `b64` (raw bytes) or
    `binary_data_size` (raw bytes after the JSON header of a binary body, `service.binary`)."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int] = Field(min_length=3, max_length=4, description="[B, H, L, D] or [H, L, D] (B = 1)")
    dtype: DTypeName
    data: Values | None = Field(None, description="values in C order: flat, or nested to the shape")
    b64: str | None = Field(None, description="base64 of the little-endian bytes in C order")
    binary_data_size: int | None = Field(
        None, ge=0, description="bytes of the tensor after the JSON header of an application/octet-stream body"
    )

    @model_validator(mode="after")
    def _one_encoding(self) -> "Tensor":
        if any(n < 1 for n in self.shape):
            raise field_error("shape", f"every dimension must be >= 1, got {self.shape}")
        if [self.data, self.b64, self.binary_data_size].count(None) != 2:
            raise field_error("data", "give exactly one of data, b64 or binary_data_size")
        problem = encoding_problem(self.dtype, self.encoding)
        if problem:
            raise field_error(_ENCODING_FIELDS[self.encoding], problem)
        return self

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(B, H, L, D), with B = 1 for a 3-D shape."""
        return tuple([1, *self.shape] if len(self.shape) == 3 else self.shape)  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def encoding(self) -> Encoding:
        return "b64" if self.b64 is not None else "data" if self.data is not None else "binary"

    def check_length(self, name: str) -> None:
        """A b64 string, binary_data_size or flat data list must hold exactly the shape's values."""
        if self.binary_data_size is not None:
            if self.binary_data_size != self.nbytes:
                raise field_error(f"{name}.binary_data_size", f"{self.binary_data_size} bytes, but shape "
                                                              f"{self.shape} of {self.dtype} takes {self.nbytes}")
        elif self.b64 is not None:
            expected = 4 * -(-self.nbytes // 3)
            if len(self.b64) != expected:
                raise field_error(
                    f"{name}.b64",
                    f"{len(self.b64)} characters, but shape {self.shape} of {self.dtype} takes {expected}",
                )
        elif not isinstance(self.data[0] if self.data else None, list) and len(self.data) != self.numel:
            raise field_error(f"{name}.data", f"{len(self.data)} values, but shape {self.shape} holds {self.numel}")

    def decode(self, name: str, binary: memoryview | None = None) -> tuple[torch.Tensor, float]:
        """The tensor as [B, H, L, D] on the CPU, from its `binary` bytes when it has
        `binary_data_size`, and its largest |value|; refuses bad base64, ragged lists and non-finite
        values.

        The checks run in numpy, single-threaded: torch's intra-op threads would contend with the
        engine's worker thread, which is busy at the same time.
        """
        storage = STORAGE[self.dtype]
        if self.binary_data_size is not None:
            field = f"{name}.binary_data_size"
            values = np.frombuffer(binary, dtype=storage)
            if not values.flags.aligned or not values.flags.writeable:  # a header of odd length; a bytes body
                values = values.copy()
        elif self.b64 is not None:
            field = f"{name}.b64"
            try:
                raw = pybase64.b64decode_as_bytearray(self.b64, validate=True)
            except binascii.Error as e:
                raise field_error(field, f"not valid base64 ({e})") from None
            if len(raw) != self.nbytes:  # the right length of text, but padded to fewer bytes
                raise field_error(field, f"decodes to {len(raw)} bytes, shape {self.shape} takes {self.nbytes}")
            values = np.frombuffer(raw, dtype=storage)
        else:
            field = f"{name}.data"
            try:
                values = np.asarray(self.data)
            except ValueError:
                raise field_error(field, f"nested lists do not form shape {self.shape}") from None
            if values.dtype.kind == "O" and all(type(x) in (int, float) for x in values.flat):  # integers past 64 bits
                try:
                    values = values.astype(np.float64)
                except OverflowError:
                    raise field_error(field, self._out_of_range()) from None
            if values.dtype.kind not in "iuf" or bool in map(type, _leaves(self.data, values.ndim)):
                raise field_error(field, "must hold only numbers, flat or nested to the shape")
            if list(values.shape) != self.shape and list(values.shape) != [self.numel]:
                raise field_error(field, f"lists of shape {list(values.shape)}, expected {self.shape}")
            with np.errstate(over="ignore"):  # out of the dtype's range becomes Inf, refused below
                values = values.astype(storage)
        peak = _peak(values)
        if not math.isfinite(peak):
            raise field_error(field, self._out_of_range() if self.data is not None else "values must be finite (no NaN or Inf)")
        return tensor_of(values, self.dtype).reshape(self.dims), peak

    def _out_of_range(self) -> str:
        """Numbers in `data` become the dtype's: past its largest they would be Inf."""
        largest = torch.finfo(DTYPES[self.dtype]).max
        return f"values must be finite in {self.dtype} (no NaN or Inf, no magnitude over {largest:.6g})"


def _leaves(nested: list, depth: int) -> Iterator:
    """The values of lists nested `depth` deep, in order: numpy reads JSON's true among numbers
    as 1 (`[true, 1]` becomes an int64 array), so only the list itself still says it was a bool."""
    for _ in range(depth - 1):
        nested = itertools.chain.from_iterable(nested)
    return iter(nested)


_BF16_MAGNITUDE = 0x7FFF


def _peak(values: np.ndarray) -> float:
    """The largest |value|, NaN or inf where a value is not finite (numpy's max and min carry them)."""
    if values.dtype == np.int16:  # bfloat16 bits: without the sign, they order as the magnitudes do
        bits = int((values & _BF16_MAGNITUDE).max())
        return float(np.array(bits << 16, dtype=np.uint32).view(np.float32))
    return float(max(values.max(), -values.min()))


class AttentionRequest(BaseModel):
    """POST /attention: q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] and the pattern."""

    model_config = ConfigDict(extra="forbid")

    q: Tensor
    k: Tensor
    v: Tensor
    pattern: Pattern | None = Field(None, validate_default=True, description="defaults to dense (null too)")
    causal: bool = True
    scale: float | None = Field(None, allow_inf_nan=False, description="defaults to 1 / sqrt(D)")
    return_lse: bool = False
    timeout_ms: float | None = Field(None, gt=0, allow_inf_nan=False, description="deadline for the whole request")
    encoding: Encoding | None = Field(None, description="response tensors' encoding; defaults to q's")

    _tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = PrivateAttr()

    @field_validator("pattern")
    @classmethod
    def _dense_by_default(cls, pattern: PatternBase | None) -> PatternBase:
        return Dense() if pattern is None else pattern

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "AttentionRequest":
        limits = (info.context or {}).get("limits")
        if limits is not None:
            self._check_limits(limits)
        self._check_shapes()
        problem = encoding_problem(self.q.dtype, self.response_encoding)
        if problem:  # the answer would be such a tensor
            raise field_error("encoding", problem)
        answer_values = math.prod(self._problem[:3]) * (self.v.dims[3] + self.return_lse)  # output, and lse
        if self.response_encoding == "data" and answer_values > MAX_DATA_VALUES:
            raise field_error("encoding", f"'data' answers at most {MAX_DATA_VALUES} values as JSON numbers, this one "
                                          f"has {answer_values}: ask for b64 or binary", TOO_LARGE)
        for name in ("q", "k", "v"):
            getattr(self, name).check_length(name)
        try:
            self.pattern.check_heads(self.q.dims[1])
        except ValueError as e:
            field, _, reason = str(e).partition(": ")
            raise field_error(field, reason) from None
        if limits is not None:
            self._check_work(limits.max_pairs)
        binary = self._binary_parts((info.context or {}).get("binary"))
        (q, q_peak), (k, k_peak), (v, v_peak) = (getattr(self, name).decode(name, binary.get(name))
                                                 for name in ("q", "k", "v"))
        d = self.q.dims[3]
        problem = float32_problem(d, self.k.dims[2], effective_scale(self.scale, d), (q_peak, k_peak, v_peak))
        if problem:
            raise field_error(*problem)
        self._tensors = q, k, v
        return self

    def _binary_parts(self, binary: memoryview | None) -> dict[str, memoryview]:
        """Each binary tensor's bytes: the body after the JSON header, cut in the order q, k, v."""
        tensors = {"q": self.q, "k": self.k, "v": self.v}
        sizes = {name: t.binary_data_size for name, t in tensors.items() if t.binary_data_size is not None}
        if not sizes:
            if binary is not None and len(binary):
                raise field_error("body", f"{len(binary)} bytes follow the JSON header, "
                                          "but no tensor has binary_data_size")
            return {}
        if binary is None:
            raise field_error(f"{next(iter(sizes))}.binary_data_size", "needs a binary body: Content-Type "
                              "application/octet-stream and an Inference-Header-Content-Length header")
        if sum(sizes.values()) != len(binary):
            raise field_error("body", f"{len(binary)} bytes follow the JSON header, but the tensors' "
                                      f"binary_data_size add up to {sum(sizes.values())}")
        parts, at = {}, 0
        for name, size in sizes.items():
            parts[name], at = binary[at : at + size], at + size
        return parts

    def _check_limits(self, limits: Limits) -> None:
        b, _, lk, _ = self.k.dims
        if b * lk > limits.max_tokens:
            raise field_error("k.shape", f"B * Lk = {b * lk} tokens, over the limit of {limits.max_tokens}", TOO_LARGE)
        h = self.q.dims[1]
        if h > limits.max_heads:
            raise field_error("q.shape", f"{h} heads, over the limit of {limits.max_heads}", TOO_LARGE)
        sizes = {"q.shape": self.q.numel, "k.shape": self.k.numel, "v.shape": self.v.numel, "output": self.output_values}
        for field, n in sizes.items():
            if n > limits.max_elements:
                raise field_error(field, f"{n} elements, over the limit of {limits.max_elements}", TOO_LARGE)

    def _check_work(self, max_pairs: int) -> None:
        """Refuse, before any tensor is decoded, a request that attends more pairs than the limit.
        The O(Lq) bound decides almost always; near the limit the exact count does, since a union's
        overlapping members may keep it under (the count is kept for the answer's meta)."""
        if self.pairs_bound() > max_pairs and (pairs := self.attended_pairs()) > max_pairs:
            raise field_error("pattern", f"the request attends {pairs} (query, key) pairs over its batch and heads, "
                                         f"over the limit of {max_pairs} (ATTN_MAX_PAIRS_PER_REQUEST)", TOO_LARGE)

    @property
    def _problem(self) -> tuple[int, int, int, int]:
        """(B, H, Lq, Lk), what pair counts take."""
        b, h, lq, _ = self.q.dims
        return b, h, lq, self.k.dims[2]

    @property
    def output_values(self) -> int:
        """B * H * Lq * Dv: the output's elements."""
        return math.prod(self._problem[:3]) * self.v.dims[3]

    def pairs_bound(self) -> int:
        """An upper bound of `attended_pairs`, at O(Lq) cost."""
        return attended_pairs_bound(self.pattern, *self._problem, self.causal)

    def attended_pairs(self) -> int:
        """The (query, key) pairs the request attends over its batch and heads (CONTRACT §2's meta),
        by the patterns' arithmetic (engine.patterns.attended_pairs), kept per shape."""
        return attended_pairs(self.pattern, *self._problem, self.causal)

    @property
    def dense_pairs(self) -> int:
        """B * H * Lq * Lk: the pairs of a dense score matrix."""
        return math.prod(self._problem)

    @property
    def response_encoding(self) -> Encoding:
        """The encoding of the response's tensors: `encoding`, by default q's."""
        return self.encoding or self.q.encoding

    def _check_shapes(self) -> None:
        if self.k.dtype != self.q.dtype or self.v.dtype != self.q.dtype:
            raise field_error("k.dtype" if self.k.dtype != self.q.dtype else "v.dtype", f"must equal q's {self.q.dtype}")
        problem = shape_problem(self.q.dims, self.k.dims, self.v.dims)
        if problem:
            raise field_error(f"{problem[0]}.shape", problem[1])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoded q, k, v as [B, H, L, D] CPU tensors."""
        return self._tensors


class TensorOut(BaseModel):
    """A response tensor, in the request's `encoding`."""

    shape: list[int]
    dtype: DTypeName
    data: list[float | None] | None = Field(None, description="values in C order; JSON has no infinity: an lse "
                                                                 "of -inf (a row with no key) is null")
    b64: str | None = None
    binary_data_size: int | None = Field(None, description="bytes after the JSON header (encoding 'binary')")

    @classmethod
    def encode(cls, t: torch.Tensor, encoding: Encoding) -> "TensorOut":
        """The tensor in `encoding`; for "binary", only its size (the bytes travel after the header)."""
        return cls(**tensor_object(t, encoding))


class Timing(BaseModel):
    queue: float = Field(description="ms waiting for the engine")
    compute: float = Field(description="ms in the engine call")
    total: float = Field(description="ms from arrival to the response being ready")


class Memory(BaseModel):
    peak_bytes: int = Field(description="measured peak the engine allocated in the call")
    dense_scores_bytes: int = Field(description="a dense [B, H, Lq, Lk] float32 score matrix")


class BatchInfo(BaseModel):
    requests: int = Field(description="client requests that ran in the same engine call")


class Meta(BaseModel):
    request_id: str
    device: str
    backend: str = Field(description=(
        "the engine's kernels for this call, one per group of heads that shares a pattern, comma-joined: "
        "sdpa (dense), band (sliding_window), strided, fixed, band+strided, band+fixed, strided+fixed and "
        "band+strided+fixed (unions of at most one window, any strides and at most one fixed), masked (any other "
        "pattern)"))
    pattern: dict[str, Any]
    batch: BatchInfo
    timing_ms: Timing
    memory: Memory
    attended_pairs: int
    density: float


class AttentionResponse(BaseModel):
    output: TensorOut = Field(description="[B, H, Lq, Dv] in q's dtype, 3-D inputs included (B = 1)")
    lse: TensorOut | None = Field(None, description="[B, H, Lq] float32 natural-log log-sum-exp, when return_lse")
    meta: Meta


class ErrorDetail(BaseModel):
    status: int
    field: str | None = Field(description="the offending field, e.g. 'k.shape'; null when none applies")
    message: str
    errors: list[dict[str, str]] = Field(
        default_factory=list, description="every problem found, as {field, message}; the first is `field` and "
                                          "`message` (empty when no field applies)"
    )


class ErrorResponse(BaseModel):
    """The body of every error response (CONTRACT §3)."""

    error: ErrorDetail
