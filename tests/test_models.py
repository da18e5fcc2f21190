"""Every built-in model under every strategy it names: exported, loaded on simulated ranks, and
equal to the same model run unsplit on one device, under whichever JAX is installed."""

import jax
import numpy as np
import pytest
from conftest import simulated

from dinb import Context, Model, ModelType, export_distributed, infer_predict_layout
from dinb.models import MODELS, get_model

SMALL = {"matmul": {}, "mlp": {"d_model": 64, "d_ff": 256, "batch": 8}}
CASES = [(name, strategy, n) for name, cls in MODELS.items() for strategy in cls.strategy_names
         for n in (1, 2, 4)]


@pytest.mark.parametrize("name,strategy,n", CASES, ids=[f"{m}-{s}-{n}" for m, s, n in CASES])
def test_every_model_and_strategy_equals_one_device(tmp_path, name, strategy, n):
    model = get_model(name, **SMALL.get(name, {}))
    params, inputs = model.init_params(3), model.example_inputs(4)
    export_distributed(model, params, infer_predict_layout(model, *inputs, device_num=n, strategy=strategy),
                       inputs, tmp_path)
    simulated(n)
    ranks = Model()
    ranks.build_from_file(tmp_path, ModelType.DINB, Context(target=["cpu"]))
    got = [t.get_data_to_numpy() for t in ranks.predict(inputs)]
    want = jax.jit(model.apply)(params, *inputs)
    want = [np.asarray(w) for w in (want if isinstance(want, (tuple, list)) else [want])]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
