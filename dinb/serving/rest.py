"""The REST server (aiohttp): Open Inference Protocol v2, MindSpore Serving's form, /metrics.

    GET  /v2/health/live   /v2/health/ready   /v2
    GET  /v2/models/{model}[/versions/{v}]            metadata
    GET  /v2/models/{model}[/versions/{v}]/ready      200 when ready, 503 when not
    GET  /v2/models/{model}[/versions/{v}]/config
    POST /v2/models/{model}[/versions/{v}]/infer      JSON, or the binary tensor data extension
    POST /v2/models/{model}[/versions/{v}]/generate   a decoder: {"text_input" | "input_ids", "parameters"}
    POST /v2/models/{model}[/versions/{v}]/generate_stream   the same, one server-sent event per token
    POST /model/{servable}:{method}                   MindSpore Serving: {"instances": [...]}
    GET  /metrics                                     Prometheus

Bad requests get 400 (404 for an unknown model) with ``{"error": message}``; a body over the
size limit 413; a servable that cannot run (a dead rank, not ready) 503. gzip and deflate bodies
are accepted (``Content-Encoding``), and responses of 16 KiB or more are compressed when
``Accept-Encoding`` asks (most HTTP libraries ask by default; small bodies gain nothing).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import numpy as np

from dinb.errors import DinbError, InputError
from dinb.serving import protocol
from dinb.serving.generation import tokens_of
from dinb.serving.inference import NotFound, RequestError
from dinb.serving.main import Main, split_address
from dinb.serving.worker import Unavailable
from dinb.version import __version__

COMPRESS_FROM = 16 * 1024  # bytes; like a web server's minimum length for gzip
COMPRESS_LEVEL = 1


class TooLarge(RequestError):
    """The body (after decompression) is over the server's limit: HTTP 413."""


def http_status(e: BaseException) -> int:
    for cls, code in ((TooLarge, 413), (InputError, 400), (NotFound, 404), (Unavailable, 503)):
        if isinstance(e, cls):
            return code
    return 500


def app(main: Main, max_body: int) -> Any:
    from aiohttp import web

    def reply(
        body: bytes | dict[str, Any],
        status: int = 200,
        request: Any = None,
        header_length: int | None = None,
        content_type: str = "application/json",
    ) -> Any:
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
        status = http_status(e)
        message = str(e) if status != 500 else f"{type(e).__name__}: {e}"
        return reply({"error_msg": message} if ms_form else {"error": message}, status)

    async def body_of(request: Any) -> bytes:
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

    def model_of(request: Any) -> tuple[Any, str, str]:
        model = request.match_info["model"]
        servable, method = main.resolve(model, request.match_info.get("version", ""))
        return servable, method, model

    async def live(request: Any) -> Any:
        return reply({"live": True})

    async def ready(request: Any) -> Any:
        return reply({"ready": main.ready}, 200 if main.ready else 503)

    async def server_metadata(request: Any) -> Any:
        return reply({"name": "dinb", "version": __version__,
                      "extensions": ["binary_tensor_data", "generate"]})

    async def model_metadata(request: Any) -> Any:
        try:
            servable, method, model = model_of(request)
            return reply(protocol.metadata(servable, method, model))
        except DinbError as e:
            return failure(e)

    async def model_ready(request: Any) -> Any:
        try:
            servable, _, _ = model_of(request)
        except DinbError as e:
            return failure(e)
        ok = servable.ready and not main.stopping
        return reply({"ready": ok}, 200 if ok else 503)

    async def model_config(request: Any) -> Any:
        try:
            servable, method, model = model_of(request)
            meta = protocol.metadata(servable, method, model)
        except DinbError as e:
            return failure(e)
        batch = servable.batcher.max_batch if servable.spec.model.with_batch_dim else 0
        return reply(
            {
                "name": model,
                "platform": "dinb",
                "max_batch_size": batch,
                "input": [
                    {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]}
                    for t in meta["inputs"]
                ],
                "output": [
                    {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]}
                    for t in meta["outputs"]
                ],
            }
        )

    async def infer(request: Any) -> Any:
        model = request.match_info["model"]
        try:
            servable, method, model = model_of(request)
            length = request.headers.get("Inference-Header-Content-Length")
            if length is not None and not length.isdigit():
                raise RequestError(f"Inference-Header-Content-Length {length!r} is not a byte count")
            inputs, req = protocol.parse_rest(await body_of(request), int(length) if length else None)
        except DinbError as e:
            main.count(model, "rest", e)
            return failure(e)
        try:
            outputs, compute_ms = await main.infer(servable, method, inputs, "rest", model)
            body, header_length = protocol.rest_response(model, servable.version, outputs, req, compute_ms)
        except DinbError as e:
            return failure(e)
        return reply(body, request=request, header_length=header_length)

    async def generate_request(request: Any) -> tuple[Any, Any, Any, str]:
        """The scheduler, the tokenizer and the queued request of a generate call."""
        servable, _, model = model_of(request)
        scheduler, codec = servable.generation()
        try:
            body = protocol.loads(await body_of(request))
        except ValueError as e:
            raise RequestError(f"the body is not JSON ({e})") from None
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
            ids = codec.encode(body["text_input"])
        else:
            ids = body["input_ids"]
            if not isinstance(ids, list):
                raise RequestError("input_ids must be a list of token ids")
        return scheduler, codec, scheduler.submit(ids, params), model

    def generated(model: str, servable_version: int, codec: Any, ids: list[int],
                  **extra: Any) -> dict[str, Any]:
        return {"model_name": model, "model_version": str(servable_version), "text_output": codec.decode(ids),
                "output_ids": ids, **extra}

    async def generate(request: Any) -> Any:
        try:
            scheduler, codec, req, model = await generate_request(request)
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
        version = model_of(request)[0].version
        return reply(generated(model, version, codec, ids, finish_reason=req.finish_reason), request=request)

    async def generate_stream(request: Any) -> Any:
        try:
            scheduler, codec, req, model = await generate_request(request)
            version = model_of(request)[0].version
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
            done = generated(model, version, codec, [], finish_reason=req.finish_reason)
            done["text_output"] = ""
            await response.write(f"data: {json.dumps(done)}\n\n".encode())
        except DinbError as e:  # the status is sent already: the error is the last event
            await response.write(f"data: {json.dumps({'error': str(e)})}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            scheduler.cancel(req)  # the client left: its slot is freed at the next step
            raise
        await response.write_eof()
        return response

    async def mindspore(request: Any) -> Any:
        target = request.match_info["target"]
        name, _, method = target.partition(":")
        try:
            servable, method = main.resolve(f"{name}.{method}" if method else name)
            instances = protocol.parse_instances(await body_of(request))
            ins, _ = servable.io(servable.method(method))
            dtypes = {t["name"]: t["dtype"] for t in ins}
            batched = servable.spec.model.with_batch_dim
            results = []
            label = f"{servable.name}.{method}"
            requests = [
                {k: protocol.cast(k, v, dtypes.get(k, str(v.dtype))) for k, v in inst.items()}
                for inst in instances
            ]
            if batched:  # each instance is one sample: stack them into one request of n rows
                names = list(requests[0])
                if any(list(r) != names for r in requests):
                    raise RequestError("every instance must give the same inputs")
                merged = {k: np.stack([r[k] for r in requests]) for k in names}
                out, _ = await main.infer(servable, method, merged, "mindspore", label)
                results = [{k: v[i] for k, v in out.items()} for i in range(len(requests))]
            else:
                for r in requests:
                    results.append((await main.infer(servable, method, r, "mindspore", label))[0])
        except DinbError as e:
            return failure(e, ms_form=True)
        return reply(protocol.instances_response(results), request=request)

    async def metrics(request: Any) -> Any:
        body, content_type = main.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    application = web.Application(client_max_size=max_body)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        application.router.add_get(prefix, model_metadata)
        application.router.add_get(prefix + "/ready", model_ready)
        application.router.add_get(prefix + "/config", model_config)
        application.router.add_post(prefix + "/infer", infer)
        application.router.add_post(prefix + "/generate", generate)
        application.router.add_post(prefix + "/generate_stream", generate_stream)
    application.router.add_get("/v2/health/live", live)
    application.router.add_get("/v2/health/ready", ready)
    application.router.add_get("/v2", server_metadata)
    application.router.add_post("/model/{target}", mindspore)
    application.router.add_get("/metrics", metrics)
    return application


async def start(main: Main, address: str, max_body: int) -> Any:
    from aiohttp import web

    host, port = split_address(address, "REST address")
    runner = web.AppRunner(app(main, max_body), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise DinbError(
            f"the REST server cannot listen on {address} ({e.strerror or e}); give another address"
        ) from None
    return runner
