"""The benchmark's MLP as an MLServer model: the same JAX function on one device, in one process.

Loaded by ``mlserver start`` (in the peers' environment, ``make .venv-peers/.installed``) from a
folder that ``benchmarks/serving.py`` writes: ``model-settings.json`` names this class and the
``.npz`` of the MLP's parameters. Merged batches (MLServer's adaptive batching) are padded to a
power of two, as dinb's batch buckets are, so each size compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

BUCKETS = (1, 2, 4, 8, 16, 32)


def mlp(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


class JaxMLP(MLModel):
    async def load(self) -> bool:
        with np.load(self.settings.parameters.uri) as f:
            self.params = {k: jnp.asarray(f[k]) for k in f.files}
        self.fn = jax.jit(mlp)
        d = self.params["w1"].shape[0]
        for b in BUCKETS:
            self.fn(self.params, jnp.zeros((b, d), jnp.float32)).block_until_ready()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        n = x.shape[0]
        b = next((b for b in BUCKETS if b >= n), n)
        if b > n:
            x = np.concatenate([x, np.zeros((b - n, x.shape[1]), np.float32)])
        y = np.asarray(self.fn(self.params, x))[:n]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("output_0", y)])
