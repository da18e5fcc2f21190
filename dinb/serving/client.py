"""MindSpore Serving's client: ``Client(address, servable_name, method_name).infer(instances)``.

It speaks the Open Inference Protocol v2 over gRPC to a dinb server (so it also talks to any v2
server serving a model named ``{servable}.{method}``)::

    client = Client("127.0.0.1:5500", "matmul", "predict")
    result = client.infer({"x": np.ones((128, 96), np.float32)})    # [{"y": array(...)}]

``instances`` is one dict or a list of dicts of arrays by input name, and the result is a list
with one dict of arrays by output name per instance. When the servable batches (an input's first
axis is the batch, ``-1`` in the model's metadata), each instance is one sample and the instances
go as one request of that many rows (inputs without a batch axis must then agree across the
instances); otherwise each instance is one request. A request
the server refuses raises :class:`ServingError` with the server's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from dinb.errors import DinbError


class ServingError(DinbError):
    """The server refused or failed a request; ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class Client:
    """A client of one servable method (see the module docstring)."""

    def __init__(
        self,
        address: str,
        servable_name: str,
        method_name: str = "predict",
        version_number: int = 0,
        timeout_s: float = 60.0,
        max_msg_mb_size: int = 100,
    ):
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        size = max_msg_mb_size * 2**20
        self._channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)],
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.model = f"{servable_name}.{method_name}"
        self.version = str(version_number) if version_number else ""
        self.address, self.timeout_s = address, timeout_s
        self._inputs: list[Any] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _call(self, rpc: str, request: Any) -> Any:
        import grpc

        try:
            return getattr(self._stub, rpc)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise ServingError(
                f"{self.model} at {self.address}: {e.code().name}: {e.details()}", e.code().name
            ) from None

    def metadata(self) -> Any:
        from tritonclient.grpc import service_pb2 as pb

        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=self.model, version=self.version))

    def infer(self, instances: dict[str, Any] | Sequence[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Run the method on each instance; one dict of outputs per instance."""
        items = [instances] if isinstance(instances, dict) else list(instances)
        if not items or not all(isinstance(i, dict) for i in items):
            raise DinbError("instances must be a dict of input arrays, or a list of them")
        if self._inputs is None:
            self._inputs = list(self.metadata().inputs)
        batched = {i.name for i in self._inputs if len(i.shape) > 0 and i.shape[0] == -1}
        if not batched:
            return [self._one({k: np.asarray(v) for k, v in i.items()}) for i in items]
        names = list(items[0])
        if any(list(i) != names for i in items):
            raise DinbError("every instance must give the same inputs")
        request = {}
        for n in names:
            values = [np.asarray(i[n]) for i in items]
            if n in batched:
                request[n] = np.stack(values)
            elif all(np.array_equal(v, values[0]) for v in values):
                request[n] = values[0]
            else:
                raise DinbError(
                    f"input {n!r} has no batch axis: the instances of one call must give it the "
                    "same value (or call infer once per value)"
                )
        outputs = self._one(request)
        return [{k: v[j] for k, v in outputs.items()} for j in range(len(items))]

    def infer_async(
        self, instances: dict[str, Any] | Sequence[dict[str, Any]]
    ) -> Future[list[dict[str, np.ndarray]]]:
        """:meth:`infer` in the background; ``.result()`` waits for it."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dinb-client")
        return self._pool.submit(self.infer, instances)

    def _one(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.grpc import service_pb2 as pb

        from dinb.formats.safetensors import np_dtype
        from dinb.serving.protocol import V2_DTYPES, v2_dtype

        request = pb.ModelInferRequest(model_name=self.model, model_version=self.version)
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            dtype = v2_dtype(str(a.dtype))
            if dtype == "BYTES":
                raise DinbError(f"input {name!r}: dtype {a.dtype} has no v2 datatype")
            request.inputs.append(
                pb.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=a.shape)
            )
            request.raw_input_contents.append(a.tobytes())
        response = self._call("ModelInfer", request)
        return {
            o.name: np.frombuffer(raw, np_dtype(V2_DTYPES[o.datatype])).reshape(list(o.shape)).copy()
            for o, raw in zip(response.outputs, response.raw_output_contents)
        }

    def close(self) -> None:
        self._channel.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
