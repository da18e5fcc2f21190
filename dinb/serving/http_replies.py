"""What every REST route shares: a request's body read (and decompressed) within a limit, a
reply (compressed when the client accepts it and the body is large enough), an error's reply
with its HTTP status. :mod:`dinb.serving.rest`, :mod:`dinb.serving.rest_generate` and
:mod:`dinb.serving.openai_api` answer with them."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

from dinb.errors import InputError
from dinb.serving import protocol
from dinb.serving.inference import NotFound, RequestError
from dinb.serving.worker import Unavailable

COMPRESS_FROM = 16 * 1024  # bytes; like a web server's minimum length for gzip
COMPRESS_LEVEL = 1


class TooLarge(RequestError):
    """The body (after decompression) is over the server's limit: HTTP 413."""


def http_status(e: BaseException) -> int:
    for cls, code in ((TooLarge, 413), (InputError, 400), (NotFound, 404), (Unavailable, 503)):
        if isinstance(e, cls):
            return code
    return 500


def reply(body: bytes | dict[str, Any], status: int = 200, request: Any = None,
          header_length: int | None = None, content_type: str = "application/json") -> Any:
    """A response, compressed when the request accepts it and the body is large enough."""
    from aiohttp import web

    data = body if isinstance(body, bytes) else protocol.dumps(body)
    headers = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    accept = request.headers.get("Accept-Encoding", "") if request is not None else ""
    if len(data) < COMPRESS_FROM:  # small bodies: compressing costs more than it saves
        accept = ""
    if "gzip" in accept:  # level 1, as web servers do: 0.13 ms for 20 KiB of JSON, level 9 0.9 ms
        data, headers["Content-Encoding"] = gzip.compress(data, COMPRESS_LEVEL), "gzip"
    elif "deflate" in accept:
        data, headers["Content-Encoding"] = zlib.compress(data, COMPRESS_LEVEL), "deflate"
    return web.Response(body=data, status=status, headers=headers, content_type=content_type)


def failure(e: BaseException, ms_form: bool = False) -> Any:
    """The error response of ``e`` (its HTTP status; MindSpore's ``error_msg`` form if asked)."""
    status = http_status(e)
    message = str(e) if status != 500 else f"{type(e).__name__}: {e}"
    return reply({"error_msg": message} if ms_form else {"error": message}, status)


async def read_body(request: Any, max_body: int) -> bytes:
    """The request's body, decompressed (gzip, deflate) within ``max_body`` bytes."""
    raw = await request.read()
    encoding = request.headers.get("Content-Encoding", "")
    if encoding in ("gzip", "deflate"):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            raw = d.decompress(raw, max_body + 1)
        except zlib.error as e:
            raise RequestError(f"the {encoding} body cannot be decompressed ({e})") from None
        if len(raw) > max_body:
            raise TooLarge(f"the decompressed body is over the server's limit of {max_body} bytes")
    return raw
