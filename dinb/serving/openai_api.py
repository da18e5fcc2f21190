"""The OpenAI-compatible routes of the REST server, for the tools decoder users speak to:

    GET  /v1/models                 the servables
    POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "stop",
                                     "seed", "stream"}
    POST /v1/chat/completions       {"model", "messages", ...}: the model's chat template applied

Both queue the request on the servable's :class:`~dinb.serving.generation.GenerationScheduler`
(the continuous batching of the generate extension), answer with ``usage`` (prompt, completion
and total tokens), and with ``"stream": true`` send server-sent events (``text_completion`` or
``chat.completion.chunk`` objects, then ``data: [DONE]``). A ``stop`` string ends the text before
it (``finish_reason: "stop"``); the model's own end tokens stop it too. Errors come in OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 404 for an
unknown model, 503 when the servable cannot run (a dead agent, a full queue).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dinb.errors import DinbError
from dinb.models.text import check_messages
from dinb.serving import protocol
from dinb.serving.generation import GenRequest, tokens_of
from dinb.serving.http_replies import http_status, read_body, reply
from dinb.serving.inference import RequestError
from dinb.serving.main import Main

#: request fields each route reads (anything else is a 400, so a typo is not silently ignored)
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "user",
}
FIELDS = {"completions": COMMON | {"prompt"}, "chat": COMMON | {"messages"}}


def error(e: BaseException, param: str | None = None) -> Any:
    """An OpenAI-shaped error response."""
    status = http_status(e)
    kind = {
        400: "invalid_request_error",
        404: "not_found_error",
        413: "invalid_request_error",
        503: "service_unavailable",
    }.get(status, "server_error")
    return reply({"error": {"message": str(e), "type": kind, "param": param, "code": None}}, status)


class StopText:
    """The text of a completion as its tokens come, cut before the first ``stop`` string."""

    def __init__(self, codec: Any, stops: list[str]):
        self.codec, self.stops, self.ids, self.sent = codec, stops, [], ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text this token completes (none once a stop string was seen)."""
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        elif self.stops:  # hold back what may be the start of a stop string
            keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - keep]
        new, self.sent = text[len(self.sent) :], text if len(text) > len(self.sent) else self.sent
        return new

    def rest(self) -> str:
        """What was held back when the completion ended without a stop string."""
        if self.stopped:
            return ""
        text = self.codec.decode(self.ids)
        new, self.sent = text[len(self.sent) :], text
        return new


class OpenAiApi:
    """``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` over one :class:`Main`."""

    def __init__(self, main: Main, max_body: int):
        self.main, self.max_body = main, max_body

    def add_routes(self, application: Any) -> None:
        application.router.add_get("/v1/models", self.models)
        application.router.add_post("/v1/completions", self.completions)
        application.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request: Any) -> Any:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "dinb"}
            for name in sorted(self.main.servables)
        ]
        return reply({"object": "list", "data": data})

    async def completions(self, request: Any) -> Any:
        return await self._answer(request, "completions")

    async def chat(self, request: Any) -> Any:
        return await self._answer(request, "chat")

    async def _body(self, request: Any, kind: str) -> dict[str, Any]:
        try:
            body = protocol.loads(await read_body(request, self.max_body))
        except ValueError as e:
            raise RequestError(f"the body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        unknown = sorted(set(body) - FIELDS[kind])
        if unknown:
            raise RequestError(f"unsupported fields {unknown}; this server reads {sorted(FIELDS[kind])}")
        if body.get("n", 1) != 1:
            raise RequestError("n: this server makes one choice per request")
        if not isinstance(body.get("model"), str):
            raise RequestError("model: give the name of a served model (GET /v1/models lists them)")
        return body

    async def _answer(self, request: Any, kind: str) -> Any:
        try:
            body = await self._body(request, kind)
            servable, _ = self.main.resolve(body["model"])
            scheduler, codec = servable.generation()
            if kind == "chat":
                check_messages(body.get("messages"))
                ids = codec.encode_chat(body["messages"])
            else:
                ids = prompt_ids(body.get("prompt"), codec)
            stops = stop_strings(body.get("stop"))
            params = {"max_tokens": body.get("max_tokens", 16)}
            params.update({k: body[k] for k in ("temperature", "top_p", "seed") if body.get(k) is not None})
            req = scheduler.submit(ids, params)
        except DinbError as e:
            return error(e)
        reply_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": reply_id, "created": int(time.time()), "model": body["model"]}
        text = StopText(codec, stops)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, kind, meta, scheduler, req, text, len(ids), include_usage)
        try:
            async for _ in self._tokens(scheduler, req, text):
                pass
        except DinbError as e:
            return error(e)
        except asyncio.CancelledError:
            scheduler.cancel(req)
            raise
        content = text.sent + text.rest()
        finish = "stop" if text.stopped or req.finish_reason == "stop" else "length"
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            if kind == "chat"
            else {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        )
        return reply(
            {
                **meta,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [choice],
                "usage": usage(len(ids), len(text.ids)),
            },
            request=request,
        )

    @staticmethod
    async def _tokens(scheduler: Any, req: GenRequest, text: StopText) -> AsyncIterator[str]:
        """The completion's new text as its tokens come; a stop string ends the request."""
        async for token in tokens_of(req):
            piece = text.add(token)
            if piece:
                yield piece
            if text.stopped:
                scheduler.cancel(req)
                return

    async def _stream(
        self,
        request: Any,
        kind: str,
        meta: dict[str, Any],
        scheduler: Any,
        req: GenRequest,
        text: StopText,
        prompt_tokens: int,
        include_usage: bool,
    ) -> Any:
        from aiohttp import web

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> bytes:
            if kind == "chat":
                delta = (
                    {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                )
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n".encode()

        try:
            await response.prepare(request)
            if kind == "chat":
                await response.write(chunk(None, first=True))
            async for piece in self._tokens(scheduler, req, text):
                await response.write(chunk(piece))
            tail = text.rest()
            if tail:
                await response.write(chunk(tail))
            finish = "stop" if text.stopped or req.finish_reason == "stop" else "length"
            await response.write(chunk(None, finish))
            if include_usage:
                body = {**meta, "object": obj, "choices": [], "usage": usage(prompt_tokens, len(text.ids))}
                await response.write(f"data: {json.dumps(body)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        except DinbError as e:  # the status is sent already: the error is the last event
            await response.write(f"data: {json.dumps({'error': {'message': str(e)}})}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            scheduler.cancel(req)
            raise
        await response.write_eof()
        return response


def prompt_ids(prompt: Any, codec: Any) -> list[int]:
    """A completion's prompt: a string, or a list of token ids (OpenAI's two forms of one prompt)."""
    if isinstance(prompt, str):
        return codec.encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return list(prompt)
    raise RequestError("prompt: give a string, or a list of token ids (one prompt per request)")


def stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("stop: give a string or up to 4 non-empty strings")
    return stops


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
