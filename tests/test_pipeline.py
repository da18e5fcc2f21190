"""Pipeline stages: strategies with stages, per-stage slice files, GPipe micro-batches on
simulated ranks, on real mpiexec ranks (MPI and XLA links), checkpoints, and bad input."""

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import dinb
from dinb.cli import mpiexec_path
from dinb.errors import InputError, SliceFileError, StrategyError
from dinb.formats import strategy_pb
from dinb.models import BertEncoder, DeepMLP, MegatronMLP, deep_mlp_reference
from dinb.sharding import pipeline
from dinb.widgets import RankOutputs, SchedulePicture
from tests.conftest import simulated

HELPER = os.path.join(os.path.dirname(__file__), "helpers", "pipeline_rank.py")
DEEP = DeepMLP(d_model=64, d_ff=128, layers=4, batch=8)
X = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
PARAMS = DEEP.init_params(1)
REF = deep_mlp_reference(PARAMS, X, 4)


def export_deep(path, n, stages, strategy="megatron", **kw):
    s = dinb.infer_predict_layout(DEEP, X, device_num=n, pipeline_stages=stages, strategy=strategy)
    return dinb.export_distributed(DEEP, PARAMS, s, [X], path, **kw)


def build(path, config=None):
    model = dinb.Model()
    model.build_from_file(path, dinb.ModelType.DINB, dinb.Context(), config)
    return model


# ---- strategies ----------------------------------------------------------------------------------
def test_stages_are_written_as_mindspore_merges_pipeline_strategies(tmp_path):
    s = dinb.infer_predict_layout(DEEP, X, device_num=4, pipeline_stages=2)
    assert (s.pipeline_stages, s.stage_device_num, s.device_num) == (2, 2, 4)
    assert s.stage_params(1) == [f"layer{i}.{k}" for i in (2, 3) for k in ("w1", "b1", "w2", "b2")]
    assert [s.rank_stage(r) for r in range(4)] == [0, 0, 1, 1]
    assert s.slice_of("layer0.w1", 1, (64, 128)) == (slice(0, 64), slice(64, 128))
    assert s.slice_of("layer0.w1", 2, (64, 128)) is None  # rank 2 is in stage 1
    data = json.loads(s.save(tmp_path / "s.json").read_text())
    assert data["current_stage"] == 1 and "1-layer3.w2" in data["parallel_layout_item"]
    assert data["parallel_layout_item"]["1-layer3.w2"]["dev_matrix"] == [2]
    assert dinb.Strategy.load(tmp_path / "s.json") == s
    back = dinb.Strategy.load(s.save(tmp_path / "s.ckpt"))  # MindSpore's protobuf form
    assert back.pipeline_stages == 2 and back.stage_of("layer2.b1") == 1 and dict(back) == dict(s)
    assert "1-layer2.b1" in strategy_pb.parse((tmp_path / "s.ckpt").read_bytes())["parallel_layout_item"]


def test_bad_stage_counts_name_the_choices():
    with pytest.raises(StrategyError, match=r"the 4 layers .* do not split into 3 .*: 1, 2, 4"):
        dinb.infer_predict_layout(DEEP, X, device_num=4, pipeline_stages=3)
    with pytest.raises(StrategyError, match=r"the 6 ranks do not split into 4 .* 6 ranks: 1, 2$"):
        dinb.infer_predict_layout(DEEP, X, device_num=6, pipeline_stages=4)
    with pytest.raises(StrategyError, match="'mlp' is not a stack of layers .* 2 pipeline stages"):
        dinb.infer_predict_layout(MegatronMLP(64, 128, 8), X, device_num=2, pipeline_stages=2)
    bert = BertEncoder(config=_tiny_bert(), batch=4, seq=8)
    with pytest.raises(StrategyError, match="the 4 attention heads do not split into 3"):
        bert.strategy(6, "megatron", pipeline_stages=2)


def test_a_parameter_without_a_stage_is_named():
    class Lost(DeepMLP):
        def pipeline_layers(self):
            return super().pipeline_layers()[:-1] + [["layer3.w1", "layer3.b1", "layer3.w2"]]

    with pytest.raises(StrategyError, match="parameter 'layer3.b2' is in no layer .* no pipeline stage"):
        Lost(64, 128, 4, 8).strategy(2, pipeline_stages=2)
    mixed = {"0-a": {"dev_matrix": [1], "tensor_map": [-1]}, "b": {"dev_matrix": [1], "tensor_map": [-1]}}
    with pytest.raises(StrategyError, match="parameter 'b' has no pipeline stage"):
        dinb.Strategy.from_json({"parallel_layout_item": mixed})
    shared = {"0-a": {"dev_matrix": [1], "tensor_map": [-1]}, "1-a": {"dev_matrix": [1], "tensor_map": [-1]}}
    with pytest.raises(StrategyError, match="'a' is in stages 0 and 1"):
        dinb.Strategy.from_json({"parallel_layout_item": shared})
    gap = {"0-a": {"dev_matrix": [1], "tensor_map": [-1]}, "2-b": {"dev_matrix": [1], "tensor_map": [-1]}}
    with pytest.raises(StrategyError, match=r"stage\(s\) \[1\] of 3 hold no parameter"):
        dinb.Strategy.from_json({"parallel_layout_item": gap})


# ---- export ----------------------------------------------------------------------------------------
def test_each_rank_file_holds_only_its_stage(tmp_path):
    paths = export_deep(tmp_path, 4, 2)
    files = [dinb.read_slice_file(p) for p in paths]
    for r, f in enumerate(files):
        stage = r // 2
        assert f.pipeline["stage"] == stage and f.pipeline["layers"] == [2 * stage, 2 * stage + 2]
        assert sorted(f.params) == sorted(f"layer{i}.{k}" for i in (2 * stage, 2 * stage + 1)
                                          for k in ("w1", "b1", "w2", "b2"))
        assert f.params[f"layer{2 * stage}.w1"].shape == (64, 64)  # its column half
        assert f.pipeline["micro_batches"] == [1, 2, 4, 8]
        assert f.pipeline["sends"][0]["shape"] == [8, 64]
    assert files[0].program == files[1].program != files[2].program
    for k, full in PARAMS.items():  # a stage's two ranks hold each weight once (b2: a copy each)
        ranks = [0, 1] if k < "layer2" else [2, 3]
        assert sum(files[r].params[k].nbytes for r in ranks) == full.nbytes * (2 if k.endswith("b2") else 1)
        assert all(k not in files[r].params for r in {0, 1, 2, 3} - set(ranks))
    assert json.loads((tmp_path / "strategy.json").read_text())["current_stage"] == 1


def test_micro_batch_choices_and_split_outputs_are_checked(tmp_path):
    with pytest.raises(StrategyError, match=r"micro_batches=3: .* counts that would: 1, 2, 4, 8"):
        export_deep(tmp_path, 2, 2, micro_batches=[3])
    with pytest.raises(StrategyError, match="cannot be cut into 8 micro-batches"):
        export_deep(tmp_path, 4, 2, "batch", micro_batches=[8])  # 1 row per micro-batch, 2 ranks
    paths = export_deep(tmp_path, 2, 2, micro_batches=[4])
    assert dinb.read_slice_file(paths[0]).pipeline["micro_batches"] == [1, 4]
    s = dinb.infer_predict_layout(DEEP, X, device_num=4, pipeline_stages=2, strategy="batch")
    split = dinb.Strategy(dict(s.items_), s.inputs, [s.inputs[0]], 2)
    with pytest.raises(StrategyError, match="split over the last stage's ranks"):
        dinb.export_distributed(DEEP, PARAMS, split, [X], tmp_path / "split")
    with pytest.raises(StrategyError, match="micro-batches are for pipeline stages"):
        dinb.export_distributed(DEEP, PARAMS, DEEP.strategy(2), [X], tmp_path / "one", micro_batches=[2])


# ---- simulated ranks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stages, n, strategy", [(2, 2, "megatron"), (2, 4, "megatron"), (4, 4, "megatron"),
                                                 (2, 4, "batch"), (2, 4, "replicated")])
def test_simulated_pipeline_equals_one_device(tmp_path, stages, n, strategy):
    simulated(n)
    export_deep(tmp_path, n, stages, strategy)
    model = build(tmp_path)
    for m in (1, 2, 4):
        out = model.predict([X], micro_batches=m)[0].get_data_to_numpy()
        np.testing.assert_allclose(out, REF, rtol=1e-5, atol=1e-5)
        per_rank = model.rank_outputs()
        last = range(n - n // stages, n)
        assert [r for r, o in per_rank.items() if o] == list(last)  # only the last stage gives outputs
        events = model.timeline()
        assert len(events) == m * n and {e.stage for e in events} == set(range(stages))
        for s in range(1, stages):  # a stage starts micro-batch i after the previous stage ended it
            ends = {e.micro: e.end for e in events if e.stage == s - 1}
            assert all(e.start >= ends[e.micro] for e in events if e.stage == s)
        assert 0.0 <= pipeline.measured_bubble(events) < 1.0
    info = model.pipeline_info()
    counts = [1, 2, 4] if strategy == "batch" else [1, 2, 4, 8]  # batch: a micro-batch's rows per rank
    assert info["stages"] == stages and info["transfer"] == "local" and info["micro_batches"] == counts
    assert "stage 0: layers 0.." in model.compiled_text()
    widget = RankOutputs.from_model(model, reference=REF)
    assert widget.agree and widget.within_reference
    assert widget.summary().startswith("rank 0: no outputs (stage 0)")


def test_predict_errors_on_pipelined_models(tmp_path):
    simulated(4)
    export_deep(tmp_path, 4, 2, micro_batches=[2])
    model = build(tmp_path)
    with pytest.raises(InputError, match=r"micro_batches = 4: .* programs for \[1, 2\] micro-batches"):
        model.predict([X], micro_batches=4)
    with pytest.raises(InputError, match="input 'x' must be float32"):
        model.predict([X.astype(np.float64)])
    cfg = tmp_path / "c.ini"
    cfg.write_text("[runtime]\nmicro_batches = 2\n")
    configured = build(tmp_path, cfg)
    configured.predict([X])
    assert len(configured.timeline()) == 2 * 4  # 2 micro-batches on 4 ranks
    cfg.write_text("[runtime]\nmicro_batches = 8\n")
    with pytest.raises(InputError, match="the config's micro_batches = 8"):
        build(tmp_path, cfg)
    with pytest.raises(dinb.ProviderError, match="runs on the xla provider"):
        dinb.Model().build_from_file(tmp_path, dinb.ModelType.DINB,
                                     dinb.Context(target=["cpu"], provider="tensorrt"))


def test_a_damaged_pipeline_record_is_a_clear_error(tmp_path):
    from dinb.export.slicefile import write_slice_file

    f = dinb.read_slice_file(export_deep(tmp_path, 2, 2)[1])
    meta = dict(f.meta, pipeline=dict(f.meta["pipeline"], stage=0))
    write_slice_file(tmp_path / "bad1.dinb", meta, f.params, {m: f.program_for(m) for m in (1, 2, 4, 8)})
    with pytest.raises(SliceFileError, match="rank 1 in stage 0 do not fit a world of 2 ranks"):
        dinb.read_slice_file(tmp_path / "bad1.dinb")


def test_minilm_in_two_stages_of_two_ranks_equals_one_device(tmp_path):
    bert = BertEncoder(config=_tiny_bert(), batch=4, seq=8)
    params = bert.init_params(0)
    x = bert.example_inputs(1)
    simulated(1)
    one = dinb.infer_predict_layout(bert, *x, device_num=1)
    dinb.export_distributed(bert, params, one, x, tmp_path / "one")
    ref = [t.get_data_to_numpy() for t in build(tmp_path / "one").predict(x)]
    simulated(4)
    s = dinb.infer_predict_layout(bert, *x, device_num=4, pipeline_stages=2)
    files = dinb.export_distributed(bert, params, s, x, tmp_path / "pp")
    stage1 = dinb.read_slice_file(files[3])
    assert not any(k.startswith("embeddings.") for k in stage1.params)
    assert [r["name"] for r in stage1.pipeline["receives"]] == ["carry_0", "carry_1"]  # hidden, mask
    model = build(tmp_path / "pp")
    for m in (1, 2, 4):
        got = [t.get_data_to_numpy() for t in model.predict(x, micro_batches=m)]
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _tiny_bert():
    return {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 4, "intermediate_size": 64,
            "vocab_size": 128, "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12}


def test_schedule_picture_formula_and_measured():
    ideal = SchedulePicture(stages=4, micro_batches=4)
    assert ideal.summary() == "4 stages, 4 micro-batches: bubble (S-1)/(M+S-1) = 3/7 = 0.43"
    assert pipeline.gpipe_schedule(2, 2) == [(0, 0, 0), (1, 0, 1), (1, 1, 0), (2, 1, 1)]
    events = [pipeline.StageEvent(s, s, m, float(m + s), float(m + s + 1))
              for s in range(2) for m in range(3)]
    assert pipeline.measured_bubble(events) == pytest.approx(pipeline.bubble_fraction(2, 3))
    picture = SchedulePicture(events)
    assert "measured 0.25" in picture.summary() and 'data-blocks="6"' in picture.children[0].value


# ---- checkpoints -----------------------------------------------------------------------------------
def test_checkpoints_reshard_between_stage_layouts_reading_only_each_stage(tmp_path):
    train = dinb.infer_predict_layout(DEEP, X, device_num=4, pipeline_stages=2)
    dinb.save_distributed_checkpoint(PARAMS, train, tmp_path / "ckpt")
    stage0 = dinb.DistributedCheckpoint({0: tmp_path / "ckpt" / "rank_0" / "checkpoint_0.safetensors"})
    assert all(n.startswith(("layer0.", "layer1.")) for n in stage0.names())  # a rank saves its stage
    cases = [(2, 2, "batch"), (2, 4, "replicated"), (4, 4, "megatron"), (1, 2, "megatron")]
    for stages, n, strategy in cases:
        predict = dinb.infer_predict_layout(DEEP, X, device_num=n, pipeline_stages=stages, strategy=strategy)
        ckpt = dinb.DistributedCheckpoint(tmp_path / "ckpt", tmp_path / "ckpt" / "strategy.json")
        for r in range(n):
            got = dinb.load_distributed_checkpoint(DEEP, tmp_path / "ckpt", predict,
                                                   tmp_path / "ckpt" / "strategy.json", rank=r)
            held = [k for k in PARAMS if predict.holds(k, r)]
            assert sorted(got) == sorted(held)
            for k in held:
                np.testing.assert_array_equal(got[k], PARAMS[k][predict.slice_of(k, r, PARAMS[k].shape)])
            slices = ckpt.load_rank(predict, r)
            assert ckpt.reads[r] == sum(a.nbytes for a in slices.values())  # only its stage's bytes
    four = dinb.infer_predict_layout(DEEP, X, device_num=4, pipeline_stages=4)
    assert dinb.rank_list_for_transform(3, tmp_path / "ckpt" / "strategy.json", four) == [2, 3]
    with pytest.raises(dinb.CheckpointError, match=r"rank 0 is in pipeline stage 0 .* 'layer3.w1' \(stage 1"):
        dinb.DistributedCheckpoint(tmp_path / "ckpt").load_rank(train, 0, ["layer3.w1"])


def test_export_from_a_pipelined_checkpoint_runs(tmp_path):
    simulated(2)
    train = dinb.infer_predict_layout(DEEP, X, device_num=4, pipeline_stages=2)
    dinb.save_distributed_checkpoint(PARAMS, train, tmp_path / "ckpt")
    predict = dinb.infer_predict_layout(DEEP, X, device_num=2, pipeline_stages=2)
    ckpt = dinb.DistributedCheckpoint(tmp_path / "ckpt")
    dinb.export_distributed(DEEP, ckpt, predict, [X], tmp_path / "out")
    np.testing.assert_allclose(build(tmp_path / "out").predict([X])[0].get_data_to_numpy(), REF,
                               rtol=1e-5, atol=1e-5)


# ---- real ranks --------------------------------------------------------------------------------------
def _mpirun(n, model_dir, out, *extra, timeout=180):
    out.mkdir(exist_ok=True)
    np.save(out / "x.npy", X)
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, HELPER, str(model_dir),
           "--input", str(out / "x.npy"), "--out", str(out), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.mpi
@pytest.mark.parametrize("stages, n, transfer", [(2, 2, "auto"), (2, 4, "auto"), (2, 4, "xla")])
def test_real_ranks_equal_one_device(tmp_path, stages, n, transfer):
    export_deep(tmp_path / "model", n, stages)
    cfg = tmp_path / "c.ini"
    cfg.write_text(f"[runtime]\nstage_transfer = {transfer}\nstage_timeout_s = 30\n")
    proc = _mpirun(n, tmp_path / "model", tmp_path / "out", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = n // stages
    for m in (1, 2, 4):
        for r in range(n):
            info = json.loads((tmp_path / "out" / f"rank{r}_m{m}.json").read_text())
            assert info["info"]["transfer"] == ("mpi" if transfer == "auto" else "xla")
            assert len(info["events"]) == m and {e[0] for e in info["events"]} == {r // t}
            if r < n - t:
                assert info["outputs"] == 0
            else:
                got = np.load(tmp_path / "out" / f"rank{r}_m{m}_0.npy")
                np.testing.assert_allclose(got, REF, rtol=1e-5, atol=1e-5)


def test_the_xla_link_between_cpu_stages_of_several_ranks_is_refused_under_jax_0_12_1():
    from dinb.runtime.runners.stage_link import xla_link_refusal

    why = xla_link_refusal("0.12.1", "cpu", 2)
    assert "jax 0.12.1" in why and "stage_transfer = mpi" in why and "jax!=0.12.1" in why
    assert xla_link_refusal("0.12.1", "cpu", 1) is None  # one communicator a process: it runs
    assert xla_link_refusal("0.12.1", "gpu", 2) is None  # NCCL, not gloo
    assert xla_link_refusal("0.12.0.1", "cpu", 2) is None


@pytest.mark.mpi
def test_a_stuck_rank_of_the_first_stage_is_named_by_the_next_stage(tmp_path):
    export_deep(tmp_path / "model", 2, 2)
    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    cfg = tmp_path / "c.ini"
    cfg.write_text("[runtime]\nstage_timeout_s = 3\n")
    t0 = time.monotonic()
    proc = _mpirun(2, tmp_path / "model", tmp_path / "out", "--config", str(cfg), "--stuck", "0",
                   "--micro", "2", timeout=120)
    assert proc.returncode != 0
    assert "rank 1 (stage 1) received nothing from rank 0 (stage 0) for micro-batch 0 of 2 within 3 s" \
        in proc.stderr
    assert time.monotonic() - t0 < 60
    assert set(glob.glob("/dev/shm/mpich_shm_*")) <= before  # mpiexec killed the stuck rank unfinalized


@pytest.mark.mpi
def test_cli_runs_a_pipelined_export(tmp_path):
    from dinb.cli import launch

    proc = subprocess.run([sys.executable, "-m", "dinb", "export", "--model", "mlp-deep", "--d-model", "64",
                           "--d-ff", "128", "--layers", "4", "--ranks", "4", "--pipeline-stages", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "for 2 stages x 2 ranks = 4 ranks" in proc.stdout and "mlp-deep3.dinb" in proc.stdout
    run = launch(4, ["--model-dir", str(tmp_path), "--micro-batches", "4"], timeout_s=120)
    assert run.returncode == 0, run.stderr
    assert "pipeline: 2 stages x 2 ranks, 4 micro-batch(es), activations over mpi" in run.stdout
    assert run.stdout.count("stage 0 of 2: no outputs") == 2
    assert run.stdout.count("tensor's name is:output_0") == 2


# ---- notebook ranks ----------------------------------------------------------------------------------
@pytest.mark.mpi
def test_notebook_ranks_run_two_stages_of_two_and_a_dead_last_stage_rank_is_named(tmp_path):
    import signal
    import threading

    from IPython.core.interactiveshell import InteractiveShell

    from dinb.errors import RankFailedError
    from dinb.notebook import cluster as cl

    export_deep(tmp_path, 4, 2)
    c = dinb.start_cluster(4, timeout_s=60)
    try:
        info = c.load(tmp_path, show_progress=False)
        assert info["pipeline"]["stages"] == 2 and info["pipeline"]["transfer"] == "mpi"
        assert list(c.roles.input_ranks) == [0, 1] and list(c.roles.output_ranks) == [2, 3]
        for m in (1, 2, 4):
            result = c.predict(X, micro_batches=m)
            np.testing.assert_allclose(result.outputs[0], REF, rtol=1e-5, atol=1e-5)
            assert result.agree
            events = c.timeline()
            assert len(events) == 4 * m and {e.rank for e in events} == {0, 1, 2, 3}
        every = c.outputs()
        assert [len(every.per_rank[r]) for r in range(4)] == [0, 0, 1, 1]
        text = RankOutputs(every).summary()
        assert "rank 0: no outputs (stage 0)" in text and "ranks [0, 1] (earlier pipeline stages)" in text
        plain = c.predict(X, fast=False, micro_batches=2)
        assert plain.agree and plain.per_rank[0] == []
        shell = InteractiveShell.instance()  # the magic passes both trailing options on
        shell.run_line_magic("load_ext", "dinb")
        shell.user_ns["X"] = X
        shell.run_line_magic("dinfer", "predict X --timeout 30 --micro-batches 4")
        assert len(c.timeline()) == 4 * 4
        victim = c.pids[3]
        threading.Timer(0.3, lambda: os.kill(victim, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(RankFailedError, match=r"rank\(s\) \[3\] died during predict"):
            for _ in range(100000):
                c.predict(X, micro_batches=2)
        assert time.monotonic() - t0 < 30
    finally:
        cl.stop_cluster()


@pytest.mark.mpi
def test_local_engines_hand_activations_over_xla(tmp_path):
    from dinb.notebook import cluster as cl

    export_deep(tmp_path, 2, 2)
    c = dinb.start_cluster(2, engines="local", timeout_s=60)
    try:
        assert c.load(tmp_path, show_progress=False)["pipeline"]["transfer"] == "xla"
        for m in (1, 4):
            np.testing.assert_allclose(c.predict(X, micro_batches=m).outputs[0], REF, rtol=1e-5, atol=1e-5)
    finally:
        cl.stop_cluster()
