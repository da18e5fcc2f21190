"""Every built-in model under every strategy it names: exported, loaded on simulated ranks, and
equal to the same model run unsplit on one device, under whichever JAX is installed."""

import jax
import numpy as np
import pytest
from conftest import simulated

from dinb import Context, Model, ModelType, export_distributed, infer_predict_layout
from dinb.models import MODELS, get_model

TINY_BERT = {"hidden_size": 48, "num_attention_heads": 12, "num_hidden_layers": 2, "intermediate_size": 96,
             "vocab_size": 64, "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
SMALL = {"matmul": {}, "mlp": {"d_model": 64, "d_ff": 256, "batch": 8},
         "minilm": {"config": TINY_BERT, "batch": 4, "seq": 8}}
NO_RANK_PROGRAM = {("minilm", "data_tensor")}
CASES = [(name, strategy, n) for name, cls in MODELS.items() for strategy in cls.strategy_names
         for n in (1, 2, 4) if not (strategy == "data_tensor" and n == 1)
         and not getattr(cls, "generates", False)]  # decoders generate: tests/test_llama.py


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


def test_bfloat16_export_halves_the_bytes_and_stays_close(tmp_path):
    from dinb import read_meta
    from dinb.formats.safetensors import np_dtype

    model = get_model("mlp", **SMALL["mlp"])
    params, (x,) = model.init_params(3), model.example_inputs(4)
    export_distributed(model, params, model.strategy(2, "megatron"), [x], tmp_path / "bf16", dtype="bfloat16",
                       batch_buckets=None)  # the weights, not the programs, are compared
    export_distributed(model, params, model.strategy(2, "megatron"), [x], tmp_path / "f32",
                       batch_buckets=None)
    meta = read_meta(tmp_path / "bf16" / "mlp1.dinb")
    assert meta["params"]["w2"]["dtype"] == "bfloat16" and meta["inputs"][0]["dtype"] == "bfloat16"
    size = {k: (tmp_path / k / "mlp1.dinb").stat().st_size for k in ("bf16", "f32")}
    assert size["bf16"] < 0.6 * size["f32"]
    simulated(2)
    ranks = Model()
    ranks.build_from_file(tmp_path / "bf16", ModelType.DINB, Context(target=["cpu"]))
    (y,) = ranks.predict([x.astype(np_dtype("bfloat16"))])
    want = np.asarray(jax.jit(model.apply)(params, x))
    assert y.dtype == np_dtype("bfloat16")
    np.testing.assert_allclose(y.get_data_to_numpy().astype(np.float32), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name,strategy,n", CASES, ids=[f"{m}-{s}-{n}" for m, s, n in CASES])
def test_rank_programs_spell_out_the_same_split(name, strategy, n):
    """Each rank's explicit program (local steps, named collectives) on its own slices gives the
    whole output on every rank, equal to the model on one device."""
    from dinb.export.tracing import input_layouts
    from dinb.models.rank_program import run_reference

    model = get_model(name, **SMALL.get(name, {}))
    params, inputs = model.init_params(3), model.example_inputs(4)
    plan = infer_predict_layout(model, *inputs, device_num=n, strategy=strategy)
    found = model.strategy_name_of(plan)
    assert found == strategy or (n == 1 and found is not None)  # on one rank the splits coincide
    program = model.rank_program(found, n)
    if (name, strategy) in NO_RANK_PROGRAM:  # collectives within groups of a 2-D mesh: XLA only
        assert program is None
        return
    layouts = input_layouts(plan, [(x.shape, str(x.dtype)) for x in inputs])
    per_rank = run_reference(
        program,
        {r: {k: v[plan[k].slice_of(r, v.shape)] for k, v in params.items()} for r in range(n)},
        {r: tuple(x[lay.slice_of(r, x.shape)] for x, lay in zip(inputs, layouts)) for r in range(n)})
    want = jax.jit(model.apply)(params, *inputs)
    want = want if isinstance(want, tuple) else (want,)
    for r in range(n):
        assert len(per_rank[r]) == len(want)
        for got, w in zip(per_rank[r], want):
            np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=2e-5, atol=2e-5)
