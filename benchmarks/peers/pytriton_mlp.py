"""The benchmark's MLP served by Triton Inference Server through PyTriton, in the peers' environment.

    pytriton_mlp.py PARAMS.npz HTTP_PORT GRPC_PORT METRICS_PORT on|off

The same JAX function on one device in this process; Triton (the server bundled with
``nvidia-pytriton``) answers HTTP and gRPC and hands each batch to it. ``on``: Triton's dynamic
batcher (at most 32 rows, no queue delay), each merged batch padded to a power of two as
dinb's buckets are; ``off``: every request is one call.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

BUCKETS = (1, 2, 4, 8, 16, 32)


def mlp(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def main() -> None:
    path, http_port, grpc_port, metrics_port, batching = sys.argv[1:6]
    with np.load(path) as f:
        params = {k: jnp.asarray(f[k]) for k in f.files}
    fn = jax.jit(mlp)
    d = params["w1"].shape[0]
    for b in BUCKETS:
        fn(params, jnp.zeros((b, d), jnp.float32)).block_until_ready()

    def run(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        b = next((b for b in BUCKETS if b >= n), n)
        if b > n:
            x = np.concatenate([x, np.zeros((b - n, d), np.float32)])
        return np.asarray(fn(params, x))[:n]

    @batch
    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"output_0": run(x)}

    config = TritonConfig(http_address="127.0.0.1", http_port=int(http_port), grpc_address="127.0.0.1",
                          grpc_port=int(grpc_port), metrics_port=int(metrics_port))
    model_config = (ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=0))
                    if batching == "on" else ModelConfig(max_batch_size=1))
    with Triton(config=config) as triton:
        triton.bind(model_name="mlp", infer_func=infer,
                    inputs=[Tensor(name="x", dtype=np.float32, shape=(d,))],
                    outputs=[Tensor(name="output_0", dtype=np.float32, shape=(d,))], config=model_config)
        triton.serve()


if __name__ == "__main__":
    main()
