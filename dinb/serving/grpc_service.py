"""The gRPC server (grpc.aio): the Open Inference Protocol v2 service ``inference.GRPCInferenceService``.

The message classes and the service registration come from ``tritonclient``'s generated modules
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), the same ones its client uses, so no
``.proto`` is compiled here. Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelConfig and ModelInfer (typed ``contents`` or ``raw_input_contents`` in,
``raw_output_contents`` out); the others answer UNIMPLEMENTED. Errors: INVALID_ARGUMENT for a bad
request, NOT_FOUND for an unknown model, UNAVAILABLE when the servable cannot run, INTERNAL else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from dinb.errors import DinbError
from dinb.serving import protocol
from dinb.serving.inference import NotFound, RequestError
from dinb.serving.main import Main, split_address
from dinb.serving.worker import Unavailable
from dinb.version import __version__

CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def grpc_code(e: BaseException) -> Any:
    import grpc

    for cls, code in (
        (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
    ):
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def abort(context: Any, e: BaseException) -> None:
    """End the call with ``e``'s status (raises)."""
    await context.abort(grpc_code(e), str(e) if isinstance(e, DinbError) else f"{type(e).__name__}: {e}")


def inputs_of(request: Any) -> dict[str, np.ndarray]:
    """A ModelInfer request's inputs as arrays (typed ``contents`` or ``raw_input_contents``)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name in out:
            raise RequestError(f"input {t.name!r} is given twice")
        if raw:
            out[t.name] = protocol.tensor_from(t.name, t.datatype, list(t.shape), raw=raw[i])
            continue
        field = CONTENTS.get(t.datatype)
        if field is None:
            raise RequestError(f"input {t.name!r}: datatype {t.datatype} needs raw_input_contents")
        data = list(getattr(t.contents, field))
        out[t.name] = protocol.tensor_from(t.name, t.datatype, list(t.shape), data=data)
    return out


def metadata_response(meta: dict[str, Any]) -> Any:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    tensors = [[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta[k]]
               for k in ("inputs", "outputs")]
    return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform="dinb",
                                    inputs=tensors[0], outputs=tensors[1])


def config_response(name: str, servable: Any, meta: dict[str, Any]) -> Any:
    batch = servable.batcher.max_batch if servable.spec.model.with_batch_dim else 0

    def tensors(cls: Any, key: str) -> list[Any]:
        return [cls(name=t["name"], data_type=mc.DataType.Value("TYPE_" + t["datatype"]), dims=t["shape"])
                for t in meta[key]]

    return pb.ModelConfigResponse(config=mc.ModelConfig(
        name=name, platform="dinb", max_batch_size=batch, input=tensors(mc.ModelInput, "inputs"),
        output=tensors(mc.ModelOutput, "outputs")))


def infer_response(request: Any, version: int, outputs: dict[str, np.ndarray], names: list[str],
                   compute_ms: float) -> Any:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(version), id=request.id)
    response.parameters["dinb_compute_ms"].double_param = compute_ms
    for name in names:
        a = np.ascontiguousarray(outputs[name])
        response.outputs.append(pb.ModelInferResponse.InferOutputTensor(
            name=name, datatype=protocol.v2_dtype(str(a.dtype)), shape=list(a.shape)))
        response.raw_output_contents.append(a.tobytes())
    return response


class Service(pbg.GRPCInferenceServiceServicer):
    """The v2 service over one :class:`Main`."""

    def __init__(self, main: Main):
        self.main = main

    async def described(self, request: Any, context: Any) -> tuple[Any, dict[str, Any]]:
        """The servable a metadata request names and its v2 metadata (aborts when unknown)."""
        try:
            servable, method = self.main.resolve(request.name, request.version)
            return servable, protocol.metadata(servable, method, request.name)
        except DinbError as e:
            await abort(context, e)
            raise  # abort raises; this line only tells the type checker

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.main.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            servable, _ = protocol.resolve(self.main.servables, request.name, request.version)
        except DinbError as e:
            await abort(context, e)
        return pb.ModelReadyResponse(ready=servable.ready and not self.main.stopping)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="dinb", version=__version__, extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return metadata_response((await self.described(request, context))[1])

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        servable, meta = await self.described(request, context)
        return config_response(request.name, servable, meta)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        main = self.main
        try:
            servable, method = main.resolve(request.model_name, request.model_version)
            inputs = inputs_of(request)
        except DinbError as e:
            main.count(request.model_name, "grpc", e)
            await abort(context, e)
        try:
            outputs, compute_ms = await main.infer(servable, method, inputs, "grpc", request.model_name)
            names = [o.name for o in request.outputs] or list(outputs)
            unknown = [n for n in names if n not in outputs]
            if unknown:
                raise RequestError(f"requested output(s) {unknown} are not among {sorted(outputs)}")
        except DinbError as e:
            await abort(context, e)
        return infer_response(request, servable.version, outputs, names, compute_ms)


async def start(main: Main, address: str, max_message_bytes: int) -> Any:
    import grpc

    split_address(address, "gRPC address")
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pbg.add_GRPCInferenceServiceServicer_to_server(Service(main), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise DinbError(f"the gRPC server cannot listen on {address} ({e}); give another address") from None
    if port == 0:
        raise DinbError(
            f"the gRPC server cannot listen on {address} (the port is taken?); give another address"
        )
    await server.start()
    return server
