"""Binary tensors: a JSON header followed by the tensors' raw bytes (Triton's binary data extension).

    POST /attention
    Content-Type: application/octet-stream
    Inference-Header-Content-Length: 212

    {"q": {"shape": [1, 8, 4096, 64], "dtype": "float32", "binary_data_size": 8388608}, "k": ...}<q><k><v>

A tensor given as `binary_data_size` instead of `data` or `b64` has its little-endian C-order
bytes after the header, in the order q, k, v. The answer comes back the same way (the output's
bytes, then the lse's) when the response `encoding` is "binary", which is the default when q is
binary. No base64 (a third more bytes, and an encode and decode on each side) and no JSON of
megabytes: for large tensors this is the fast way in and out. JSON requests are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

HEADER = "Inference-Header-Content-Length"
MEDIA_TYPE = "application/octet-stream"
ALIGN = 64  # bytes: `join` starts the tensors at a multiple of this


class BinaryBodyError(ValueError):
    """The binary body does not parse; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def split(body: bytes | bytearray, header_length: str | None) -> tuple[memoryview, memoryview]:
    """(JSON header, the tensors' bytes) of a binary body."""
    if header_length is None:
        raise BinaryBodyError(HEADER, f"required with Content-Type {MEDIA_TYPE}: the JSON header's length in bytes")
    # ASCII digits only, and few: str.isdigit() takes '²', and int() refuses over 4300 digits.
    if not re.fullmatch(r"[0-9]{1,20}", header_length.strip()) or int(header_length) > len(body):
        raise BinaryBodyError(HEADER, f"{header_length[:40]!r} is not a byte count within the {len(body)}-byte body")
    view = memoryview(body)
    n = int(header_length)
    return view[:n], view[n:]


def join(header: bytes, tensors: Sequence) -> tuple[bytes, dict[str, str]]:
    """A binary body (the header padded with spaces, still the same JSON, to a multiple of ALIGN
    bytes so that the tensors start aligned; then the bytes of each tensor, any object with the
    buffer protocol) and the headers for it."""
    header += b" " * (-len(header) % ALIGN)
    return b"".join([header, *tensors]), {HEADER: str(len(header))}

