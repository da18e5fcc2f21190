"""A decoder's routes on the REST server: Triton's generate extension.

    POST /v2/models/{model}[/versions/{v}]/generate          {"text_input" | "input_ids", "parameters"}
    POST /v2/models/{model}[/versions/{v}]/generate_stream   the same, one server-sent event per token

Both queue the request on the servable's :class:`~dinb.serving.generation.GenerationScheduler`
(continuous batching over the sequence slots); a client that leaves frees its slot at the next
step.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from dinb.errors import DinbError
from dinb.serving import protocol
from dinb.serving.generation import tokens_of
from dinb.serving.http_replies import failure, read_body, reply
from dinb.serving.inference import RequestError
from dinb.serving.main import Main


def generated(model: str, servable_version: int, codec: Any, ids: list[int], **extra: Any) -> dict[str, Any]:
    """A generate response (or event) of ``ids``."""
    return {"model_name": model, "model_version": str(servable_version), "text_output": codec.decode(ids),
            "output_ids": ids, **extra}


def prompt_ids(body: Any, codec: Any) -> tuple[list[int], dict[str, Any]]:
    """The prompt's token ids and the parameters of a generate body (400 for a bad one)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with text_input or input_ids")
    unknown = sorted(set(body) - {"id", "text_input", "input_ids", "parameters"})
    if unknown:
        raise RequestError(f"unknown fields {unknown}; give text_input (or input_ids) and parameters")
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError("parameters must be a JSON object")
    if ("text_input" in body) == ("input_ids" in body):
        raise RequestError("give the prompt as text_input or as input_ids, one of the two")
    if "text_input" in body:
        if not isinstance(body["text_input"], str):
            raise RequestError("text_input must be a string")
        return codec.encode(body["text_input"]), params
    if not isinstance(body["input_ids"], list):
        raise RequestError("input_ids must be a list of token ids")
    return body["input_ids"], params


class GenerateApi:
    """Triton's generate routes over one :class:`Main`."""

    def __init__(self, main: Main, max_body: int):
        self.main, self.max_body = main, max_body

    def add_routes(self, application: Any) -> None:
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            application.router.add_post(prefix + "/generate", self.generate)
            application.router.add_post(prefix + "/generate_stream", self.generate_stream)

    async def submit(self, request: Any) -> tuple[Any, Any, Any, str, int]:
        """The scheduler, the tokenizer, the queued request, the model's name and version."""
        model = request.match_info["model"]
        servable, _ = self.main.resolve(model, request.match_info.get("version", ""))
        scheduler, codec = servable.generation()
        try:
            body = protocol.loads(await read_body(request, self.max_body))
        except ValueError as e:
            raise RequestError(f"the body is not JSON ({e})") from None
        ids, params = prompt_ids(body, codec)
        return scheduler, codec, scheduler.submit(ids, params), model, servable.version

    async def generate(self, request: Any) -> Any:
        try:
            scheduler, codec, req, model, version = await self.submit(request)
        except DinbError as e:
            return failure(e)
        ids: list[int] = []
        try:
            async for token in tokens_of(req):
                ids.append(token)
        except DinbError as e:
            return failure(e)
        except asyncio.CancelledError:
            scheduler.cancel(req)
            raise
        return reply(generated(model, version, codec, ids, finish_reason=req.finish_reason), request=request)

    async def generate_stream(self, request: Any) -> Any:
        from aiohttp import web

        try:
            scheduler, codec, req, model, version = await self.submit(request)
        except DinbError as e:
            return failure(e)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        ids: list[int] = []
        try:
            await response.prepare(request)
            async for token in tokens_of(req):
                before = codec.decode(ids)
                ids.append(token)
                event = generated(model, version, codec, [token], index=len(ids) - 1)
                event["text_output"] = codec.decode(ids)[len(before):]
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            done = generated(model, version, codec, [], finish_reason=req.finish_reason, text_output="")
            await response.write(f"data: {json.dumps(done)}\n\n".encode())
        except DinbError as e:  # the status is sent already: the error is the last event
            await response.write(f"data: {json.dumps({'error': str(e)})}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            scheduler.cancel(req)  # the client left: its slot is freed at the next step
            raise
        await response.write_eof()
        return response
