"""The Open Inference Protocol v2 (KServe v2, Triton) and MindSpore Serving's REST form, as arrays.

Model names: each servable method is the v2 model ``{servable}.{method}``; a servable's method
``predict`` (or its only method) also answers to the plain servable name. So MindSpore Serving's
``matmul`` servable with method ``predict`` is model ``matmul`` (or ``matmul.predict``) for
tritonclient, and ``POST /model/matmul:predict`` in MindSpore's form.

REST bodies are JSON, or with the *binary tensor data* extension a JSON header of
``Inference-Header-Content-Length`` bytes followed by each tensor's raw little-endian bytes
(``"parameters": {"binary_data_size": n}`` on the tensor). Outputs go back as binary when the
request asks for it (``binary_data_output`` or an output's ``binary_data``). Every count, size and
shape in a request is checked against the bytes that came with it; what does not fit is a
:class:`RequestError` naming the input.

JSON is read and written with orjson: it writes a float32 output as each value's shortest
float32 form straight from the array (17 us for 1024 values, against 580 us for ``tolist`` and
the standard library's ``json``, whose float64 forms also double the body). Standard JSON has no
NaN or infinity: such a value goes out as ``null``, and a request holding one is refused.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import orjson

from dinb.formats.safetensors import np_dtype
from dinb.serving.inference import NotFound, RequestError

V2_DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
NP_TO_V2 = {v: k for k, v in V2_DTYPES.items()}
MAX_DIMS = 64


def loads(body: bytes | str) -> Any:
    """A JSON body (``ValueError`` when it is not JSON)."""
    return orjson.loads(body)


def dumps(obj: Any) -> bytes:
    """JSON bytes; numpy arrays go as (nested) lists of their values."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def v2_dtype(np_name: str) -> str:
    return NP_TO_V2.get(np_name, "BYTES")


def resolve(servables: dict[str, Any], model: str, version: str = "") -> tuple[Any, str]:
    """The servable and method a v2 model name stands for (see the module docstring)."""
    name, _, method = model.partition(".")
    servable = servables.get(name)
    if servable is None:
        raise NotFound(f"no model {model!r}; the models are {sorted(model_names(servables))}")
    if version and version != str(servable.version):
        raise NotFound(f"model {name!r} has version {servable.version}, not {version!r}")
    if not method:
        methods = list(servable.spec.methods)
        method = "predict" if "predict" in methods else methods[0] if len(methods) == 1 else ""
        if not method:
            raise NotFound(f"servable {name!r} has methods {methods}; ask for {name}.<method>")
    servable.method(method)
    return servable, method


def model_names(servables: dict[str, Any]) -> list[str]:
    names = []
    for name, s in servables.items():
        names += [f"{name}.{m}" for m in s.spec.methods]
        if "predict" in s.spec.methods or len(s.spec.methods) == 1:
            names.append(name)
    return names


def metadata(servable: Any, method: str, model: str) -> dict[str, Any]:
    ins, outs = servable.io(servable.method(method))
    conv = [{"name": t["name"], "datatype": v2_dtype(t["dtype"]), "shape": t["shape"]} for t in ins]
    return {
        "name": model,
        "versions": [str(servable.version)],
        "platform": "dinb",
        "inputs": conv,
        "outputs": [{"name": t["name"], "datatype": v2_dtype(t["dtype"]), "shape": t["shape"]} for t in outs],
    }


# ---- tensors in ------------------------------------------------------------------------------
def tensor_from(
    name: str, datatype: Any, shape: Any, data: Any = None, raw: bytes | None = None
) -> np.ndarray:
    """One input tensor from its v2 description and its data (JSON values or raw bytes)."""
    if not isinstance(datatype, str) or datatype not in V2_DTYPES:
        raise RequestError(f"input {name!r}: datatype {datatype!r} is not one of {sorted(V2_DTYPES)}")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise RequestError(f"input {name!r}: shape {shape!r} must be a list of sizes >= 0")
    dtype = np_dtype(V2_DTYPES[datatype])
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise RequestError(
                f"input {name!r}: {datatype}{list(shape)} needs {count * dtype.itemsize} bytes, "
                f"the request carries {len(raw)}"
            )
        return np.frombuffer(raw, dtype).reshape(shape)
    if data is None:
        raise RequestError(f"input {name!r} has neither data nor binary data")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise RequestError(f"input {name!r}: its data are not {datatype} values ({e})") from None
    if arr.size != count:
        raise RequestError(
            f"input {name!r}: shape {list(shape)} holds {count} values, the data has {arr.size}"
        )
    return arr.reshape(shape)


def parse_rest(body: bytes, header_length: int | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A v2 REST infer request: its inputs by name, and the request JSON (for its outputs part)."""
    head = body if header_length is None else body[:header_length]
    if header_length is not None and not 0 <= header_length <= len(body):
        raise RequestError(
            f"Inference-Header-Content-Length {header_length} is beyond the body's {len(body)} bytes"
        )
    try:
        req = loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request is not valid JSON ({e})") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise RequestError('the request must be a JSON object with an "inputs" list')
    offset = 0 if header_length is None else header_length
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a name")
        size = (
            (t.get("parameters") or {}).get("binary_data_size")
            if isinstance(t.get("parameters"), dict)
            else None
        )
        raw = None
        if size is not None:
            if header_length is None or not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise RequestError(
                    f"input {t['name']!r}: binary_data_size {size!r} does not fit the binary "
                    f"part of the body ({len(body) - offset} bytes left)"
                )
            raw, offset = body[offset : offset + size], offset + size
        if t["name"] in inputs:
            raise RequestError(f"input {t['name']!r} is given twice")
        inputs[t["name"]] = tensor_from(t["name"], t.get("datatype"), t.get("shape"), t.get("data"), raw)
    if header_length is not None and offset != len(body):
        raise RequestError(f"the body has {len(body) - offset} bytes beyond its tensors' binary data")
    return inputs, req


def rest_response(
    model: str, version: int, outputs: dict[str, np.ndarray], req: dict[str, Any], compute_ms: float = 0.0
) -> tuple[bytes, int | None]:
    """The v2 REST response body, and the JSON header's length when outputs go as binary. The
    response's parameters carry ``dinb_compute_ms``: the ranks' own time on this request."""
    params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
    wanted = req.get("outputs") if isinstance(req.get("outputs"), list) else None
    binary_all = bool(params.get("binary_data_output", False))
    chosen: list[tuple[str, bool]] = []
    if wanted:
        for o in wanted:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in outputs:
                raise RequestError(f"requested output {name!r} is not one of {sorted(outputs)}")
            p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
            chosen.append((name, bool(p.get("binary_data", binary_all))))
    else:
        chosen = [(n, binary_all) for n in outputs]
    out_json, blobs = [], []
    for name, binary in chosen:
        a = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": v2_dtype(str(a.dtype)), "shape": list(a.shape)}
        if binary:
            data = a.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = _json_ready(a.reshape(-1))
        out_json.append(entry)
    body: dict[str, Any] = {
        "model_name": model,
        "model_version": str(version),
        "outputs": out_json,
        "parameters": {"dinb_compute_ms": round(compute_ms, 4)},
    }
    if req.get("id") is not None:
        body["id"] = req["id"]
    head = dumps(body)
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)


# ---- MindSpore Serving's own REST form -------------------------------------------------------
def parse_instances(body: bytes) -> list[dict[str, np.ndarray]]:
    """``{"instances": [{name: value}, ...]}``: a value is nested lists, a scalar, or
    ``{"b64": ..., "type": "float32", "shape": [...]}``."""
    try:
        req = loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request is not valid JSON ({e})") from None
    instances = req.get("instances") if isinstance(req, dict) else None
    if isinstance(instances, dict):
        instances = [instances]
    if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
        raise RequestError('the request must be {"instances": [{input name: value, ...}, ...]}')
    return [{name: _ms_value(name, v) for name, v in inst.items()} for inst in instances]


def _ms_value(name: str, v: Any) -> np.ndarray:
    if isinstance(v, dict) and "b64" in v:
        try:
            raw = base64.b64decode(v["b64"], validate=True)
            dtype = np_dtype(str(v.get("type", "float32")))
        except (ValueError, TypeError) as e:
            raise RequestError(f"input {name!r}: bad b64 value ({e})") from None
        shape = v.get("shape", [len(raw) // dtype.itemsize])
        return tensor_from(name, v2_dtype(str(dtype)), shape, raw=raw)
    try:
        arr = np.asarray(v)
    except (ValueError, TypeError) as e:
        raise RequestError(f"input {name!r}: not a tensor ({e})") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise RequestError(f"input {name!r}: give numbers (nested lists) or a b64 tensor")
    return arr  # JSON numbers: cast to the input's dtype by the caller, which knows it


def cast(name: str, a: np.ndarray, dtype: str) -> np.ndarray:
    """An untyped (JSON) value as the input's dtype, when that loses no kind (ints to floats yes,
    floats to ints no)."""
    want = np_dtype(dtype)
    if a.dtype == want:
        return a
    if not np.can_cast(a.dtype, want, "same_kind") and not (a.dtype.kind in "iu" and want.kind in "iu"):
        raise RequestError(f"input {name!r} must be {dtype}, got {a.dtype} values")
    return a.astype(want)


def instances_response(results: list[dict[str, np.ndarray]]) -> bytes:
    return dumps({"instances": [{k: _json_ready(v) for k, v in r.items()} for r in results]})


def _json_ready(a: np.ndarray) -> Any:
    """An array orjson writes: C order, a type it knows (bfloat16 as float32)."""
    a = np.ascontiguousarray(a)
    if a.ndim == 0:
        return a.item()
    return a.astype(np.float32) if a.dtype == np_dtype("bfloat16") else a
