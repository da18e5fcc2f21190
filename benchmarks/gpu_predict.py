"""dinb's predict beside plain JAX on one GPU, in one process: the Megatron MLP at batch 8.

    python benchmarks/gpu_predict.py [--d-model 4096 --d-ff 16384 --batch 8 --repeat 500]

For float32 and bfloat16 weights (d=4096, ff=16384: 512 MiB in float32, 256 MiB in bfloat16):

  (a) plain JAX, host in and out    np.asarray(jax.jit(mlp)(params_on_gpu, x_numpy))
  (b) plain JAX, all on the GPU     jax.jit(mlp)(params, x_on_gpu).block_until_ready()
  (c) dinb, one rank                Model.predict([x_numpy]) -> output tensors (numpy)
  (d) plain JAX, pipelined          100 calls on the GPU, each fed the last output, one wait
  (e) dinb's program, pipelined     the same with the program dinb compiled from the slice file

Medians over ``--repeat`` calls after a warm-up, the cases taken in alternation, best of
``--rounds``. (c)/(a) is dinb's per-call cost over plain JAX with the same host input and
output. Every case gives the HBM bandwidth it achieves, the bytes of weights a call streams over
its time, against the GPU's peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s; --peak-tb-s for others):
(a)-(c) include the synchronous host round trip of every call, (d)-(e) show what the kernels
stream when calls follow each other. Results go to ``benchmarks/results/gpu_predict.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_overhead import machine, median_ms  # noqa: E402

PEAK_TB_S = {"H100": 3.35, "H200": 4.8, "A100": 2.0}
PIPELINE = 100  # calls queued back to back in (d) and (e)


def gpu_info(device: object) -> dict[str, object]:
    kind = getattr(device, "device_kind", "")
    info: dict[str, object] = {"gpu": kind}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        info["nvidia_smi"] = out.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-tb-s", type=float, default=None)
    parser.add_argument("--target", default="gpu", choices=["gpu", "cpu"], help="cpu: try the script here")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_predict.json"))
    args = parser.parse_args()

    import dinb

    job = dinb.init_ranks(args.target)  # binds the GPU before any other JAX call
    import jax

    from dinb.models import MegatronMLP

    device = job.devices[0]
    peak = args.peak_tb_s or next((v for k, v in PEAK_TB_S.items() if k in device.device_kind), None)
    net = MegatronMLP(d_model=args.d_model, d_ff=args.d_ff, batch=args.batch)
    params = net.init_params(0)
    x32 = net.example_inputs(1)[0]
    rows = [row for dtype in ("float32", "bfloat16")
            for row in measure(net, params, x32, dtype, device, peak, args)]
    print(f"Megatron MLP d={args.d_model} ff={args.d_ff} batch={args.batch} on {device.device_kind} "
          f"(peak {peak} TB/s), jax {jax.__version__}; median of {args.repeat}, best of {args.rounds} rounds")
    print(f"{'dtype':<9} {'case':<30} {'ms':>8} {'/(a)':>7} {'TB/s':>7} {'% peak':>7}")
    for r in rows:
        print(f"{r['dtype']:<9} ({r['case']}) {r['what']:<26} {r['ms']:>8.4f} {r['ratio_to_a']:>7.3f} "
              f"{r['hbm_tb_s']:>7.3f} {r['hbm_pct_peak'] if r['hbm_pct_peak'] is not None else '-':>7}")
    out = {"machine": {**machine(), **gpu_info(device)}, "config": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"results in {args.out}")
    return 0


def measure(net: object, params: dict, x32: np.ndarray, dtype: str, device: object, peak: float | None,
            args: argparse.Namespace) -> list[dict]:
    """The three cases for one dtype; the weights leave the GPU before the next dtype."""
    import jax

    import dinb
    from dinb.formats.safetensors import np_dtype

    dt = np_dtype(dtype)
    x = x32.astype(dt)
    weight_bytes = sum(v.size for v in params.values()) * dt.itemsize
    with tempfile.TemporaryDirectory(prefix="dinb-gpu-bench-") as d:
        dinb.export_distributed(net, params, net.strategy(1), [x32], d, dtype=dtype)
        model = dinb.Model()
        model.build_from_file(d, dinb.ModelType.DINB, dinb.Context(target=[args.target]))
    plain = jax.jit(net.apply)
    on_gpu = jax.device_put({k: v.astype(dt) for k, v in params.items()}, device)
    x_gpu = jax.device_put(x, device)
    inputs = model.get_inputs()
    inputs[0].set_data_from_numpy(x)
    want = np.asarray(plain(on_gpu, x)).astype(np.float32)
    got = model.predict(inputs)[0].get_data_to_numpy().astype(np.float32)
    assert np.allclose(got, want, rtol=2e-2, atol=2e-2), np.abs(got - want).max()
    def chain(step: Any) -> None:
        y = x_gpu
        for _ in range(PIPELINE):
            y = step(y)
        y.block_until_ready()

    best = _alternate({
        "a": lambda: np.asarray(plain(on_gpu, x)),
        "b": lambda: plain(on_gpu, x_gpu).block_until_ready(),
        "c": lambda: [t.get_data_to_numpy() for t in model.predict(inputs)],
        "d": lambda: chain(lambda y: plain(on_gpu, y)),
        "e": lambda: chain(lambda y: model.runner.program(model.runner.params, y)[0]),
    }, args)
    best["d"] /= PIPELINE
    best["e"] /= PIPELINE
    rows = []
    labels = {"a": "plain JAX, host in/out", "b": "plain JAX, on GPU", "c": "dinb Model.predict",
              "d": "plain JAX, pipelined", "e": "dinb program, pipelined"}
    for key, label in labels.items():
        tb_s = weight_bytes / (best[key] / 1e3) / 1e12
        rows.append({"dtype": dtype, "case": key, "what": label, "ms": round(best[key], 4),
                     "ratio_to_a": round(best[key] / best["a"], 3), "hbm_tb_s": round(tb_s, 3),
                     "hbm_pct_peak": round(100 * tb_s / peak, 1) if peak else None,
                     "weight_mib": round(weight_bytes / 2**20, 1)})
    return rows


def _alternate(cases: dict, args: argparse.Namespace) -> dict[str, float]:
    """Each case's best median over ``rounds`` rounds, the cases taken in turn in every round."""
    best = {k: float("inf") for k in cases}
    for fn in cases.values():  # warm-up, untimed
        for _ in range(50):
            fn()
    for _ in range(args.rounds):
        for key, fn in cases.items():
            best[key] = min(best[key], median_ms(fn, args.repeat))
    return best


if __name__ == "__main__":
    sys.exit(main())
