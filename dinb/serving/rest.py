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
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions   OpenAI's (a decoder; see
                                                      dinb.serving.openai_api)

Bad requests get 400 (404 for an unknown model) with ``{"error": message}``; a body over the
size limit 413; a servable that cannot run (a dead rank, not ready) 503. gzip and deflate bodies
are accepted (``Content-Encoding``), and responses of 16 KiB or more are compressed when
``Accept-Encoding`` asks (most HTTP libraries ask by default; small bodies gain nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dinb.errors import DinbError
from dinb.serving import protocol
from dinb.serving.http_replies import failure, read_body, reply
from dinb.serving.inference import RequestError
from dinb.serving.main import Main, split_address
from dinb.serving.openai_api import OpenAiApi
from dinb.serving.rest_generate import GenerateApi
from dinb.version import __version__


def tensor_config(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Triton's model-config form of metadata tensors."""
    return [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in tensors]


class RestApi:
    """The routes of the v2 protocol and of MindSpore Serving's REST form over one :class:`Main`."""

    def __init__(self, main: Main, max_body: int):
        self.main, self.max_body = main, max_body

    def body_of(self, request: Any) -> Any:
        return read_body(request, self.max_body)

    def model_of(self, request: Any) -> tuple[Any, str, str]:
        """The servable, method and model name a request's path names (404 if none)."""
        model = request.match_info["model"]
        servable, method = self.main.resolve(model, request.match_info.get("version", ""))
        return servable, method, model

    def add_routes(self, application: Any) -> None:
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            application.router.add_get(prefix, self.model_metadata)
            application.router.add_get(prefix + "/ready", self.model_ready)
            application.router.add_get(prefix + "/config", self.model_config)
            application.router.add_post(prefix + "/infer", self.infer)
        application.router.add_get("/v2/health/live", self.live)
        application.router.add_get("/v2/health/ready", self.ready)
        application.router.add_get("/v2", self.server_metadata)
        application.router.add_post("/model/{target}", self.mindspore)
        application.router.add_get("/metrics", self.metrics)

    async def live(self, request: Any) -> Any:
        return reply({"live": True})

    async def ready(self, request: Any) -> Any:
        return reply({"ready": self.main.ready}, 200 if self.main.ready else 503)

    async def server_metadata(self, request: Any) -> Any:
        return reply({"name": "dinb", "version": __version__,
                      "extensions": ["binary_tensor_data", "generate"]})

    async def model_metadata(self, request: Any) -> Any:
        try:
            return reply(protocol.metadata(*self.model_of(request)))
        except DinbError as e:
            return failure(e)

    async def model_ready(self, request: Any) -> Any:
        try:
            servable, _, _ = self.model_of(request)
        except DinbError as e:
            return failure(e)
        ok = servable.ready and not self.main.stopping
        return reply({"ready": ok}, 200 if ok else 503)

    async def model_config(self, request: Any) -> Any:
        try:
            servable, method, model = self.model_of(request)
            meta = protocol.metadata(servable, method, model)
        except DinbError as e:
            return failure(e)
        batch = servable.batcher.max_batch if servable.spec.model.with_batch_dim else 0
        return reply({"name": model, "platform": "dinb", "max_batch_size": batch,
                      "input": tensor_config(meta["inputs"]), "output": tensor_config(meta["outputs"])})

    async def infer(self, request: Any) -> Any:
        model = request.match_info["model"]
        try:
            servable, method, model = self.model_of(request)
            length = request.headers.get("Inference-Header-Content-Length")
            if length is not None and not length.isdigit():
                raise RequestError(f"Inference-Header-Content-Length {length!r} is not a byte count")
            inputs, req = protocol.parse_rest(await self.body_of(request), int(length) if length else None)
        except DinbError as e:
            self.main.count(model, "rest", e)
            return failure(e)
        try:
            outputs, compute_ms = await self.main.infer(servable, method, inputs, "rest", model)
            body, header_length = protocol.rest_response(model, servable.version, outputs, req, compute_ms)
        except DinbError as e:
            return failure(e)
        return reply(body, request=request, header_length=header_length)

    async def mindspore(self, request: Any) -> Any:
        """``POST /model/{servable}:{method}`` with ``{"instances": [...]}``."""
        name, _, method = request.match_info["target"].partition(":")
        try:
            servable, method = self.main.resolve(f"{name}.{method}" if method else name)
            instances = protocol.parse_instances(await self.body_of(request))
            ins, _ = servable.io(servable.method(method))
            dtypes = {t["name"]: t["dtype"] for t in ins}
            requests = [{k: protocol.cast(k, v, dtypes.get(k, str(v.dtype))) for k, v in inst.items()}
                        for inst in instances]
            results = await self._run_instances(servable, method, requests)
        except DinbError as e:
            return failure(e, ms_form=True)
        return reply(protocol.instances_response(results), request=request)

    async def _run_instances(self, servable: Any, method: str,
                             requests: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Each instance's outputs: one request of n rows for a model with a batch axis (each
        instance is one sample), else one request per instance."""
        label = f"{servable.name}.{method}"
        if not servable.spec.model.with_batch_dim:
            return [(await self.main.infer(servable, method, r, "mindspore", label))[0] for r in requests]
        names = list(requests[0])
        if any(list(r) != names for r in requests):
            raise RequestError("every instance must give the same inputs")
        merged = {k: np.stack([r[k] for r in requests]) for k in names}
        out, _ = await self.main.infer(servable, method, merged, "mindspore", label)
        return [{k: v[i] for k, v in out.items()} for i in range(len(requests))]

    async def metrics(self, request: Any) -> Any:
        from aiohttp import web

        body, content_type = self.main.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})


def app(main: Main, max_body: int) -> Any:
    """The aiohttp application: the v2 and MindSpore routes, and a decoder's generate routes."""
    from aiohttp import web

    application = web.Application(client_max_size=max_body)
    RestApi(main, max_body).add_routes(application)
    GenerateApi(main, max_body).add_routes(application)
    OpenAiApi(main, max_body).add_routes(application)
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
