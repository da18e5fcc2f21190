"""Which form of a Llama decode step runs nearest its memory floor on a GPU: the variants measured
before dinb's decoder programs were chosen (see docs/architecture.md, "The decode programs").

    python benchmarks/decode_variants.py --out results.json [--budget-s 480]

Plain JAX, random bfloat16 weights made on the device, no dinb import. Every variant runs
``--steps`` decode steps inside one ``lax.fori_loop`` (the token picked on the device), so the
host never waits between steps; its time per step is the median of 5 such loops. The floor is
the bytes one step must read (every weight once, plus the keys and values in use) over the
bandwidth of a device-to-device copy measured in the same run, and over the datasheet's 4.8 TB/s.

Variants, each a switch of the step:
  ``window``  the attention reads the first W cache positions (a static slice) instead of all
              ``max_len``: its cost follows the positions in use, by bucket;
  ``fused``   q, k, v in one matrix and gate, up in one (one GEMV each instead of three and two);
  ``scan``    the layers as one ``lax.scan`` over stacked weights instead of unrolled;
  ``sample``  temperature and top-p picked on the device (sort, cumulative sum, Gumbel) instead
              of argmax.
Besides: prefill attention for 2048 tokens (XLA's einsum, ``jax.nn.dot_product_attention`` with
XLA and cuDNN), a whole 2048-token prefill, and Pallas' ``decode_attention.gqa`` beside XLA's.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from typing import Any

SHAPES = {
    "1b": dict(hidden=2048, ff=8192, heads=32, kv=8, layers=16, vocab=32000, tied=False),
    "3b": dict(hidden=3072, ff=8192, heads=24, kv=8, layers=28, vocab=128256, tied=True),
}


def weight_bytes(s: dict[str, Any]) -> int:
    h, f, dh = s["hidden"], s["ff"], s["hidden"] // s["heads"]
    per_layer = h * (s["heads"] * dh) * 2 + h * (s["kv"] * dh) * 2 + 3 * h * f + 2 * h
    head = s["vocab"] * h  # the logits head (the embedding when tied); one row of the table read
    return 2 * (s["layers"] * per_layer + head + h)


def make_params(s: dict[str, Any], fused: bool, scan: bool, key: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    h, f, dh, L = s["hidden"], s["ff"], s["hidden"] // s["heads"], s["layers"]
    qd, kd = s["heads"] * dh, s["kv"] * dh
    shapes = {"attn_norm": (h,), "mlp_norm": (h,), "o": (h, qd), "down": (h, f)}
    if fused:
        shapes.update(qkv=(qd + 2 * kd, h), gate_up=(2 * f, h))
    else:
        shapes.update(q=(qd, h), k=(kd, h), v=(kd, h), gate=(f, h), up=(f, h))
    keys = iter(jax.random.split(key, 4 + len(shapes) * L))

    def rnd(shape: tuple[int, ...]) -> Any:
        if len(shape) == 1:
            return jnp.ones(shape, jnp.bfloat16)
        return (jax.random.normal(next(keys), shape, jnp.float32) / shape[-1] ** 0.5).astype(jnp.bfloat16)

    layers = [{n: rnd(sh) for n, sh in shapes.items()} for _ in range(L)]
    p: dict[str, Any] = {"embed": rnd((s["vocab"], h)), "norm": jnp.ones((h,), jnp.bfloat16)}
    if not s["tied"]:
        p["lm_head"] = rnd((s["vocab"], h))
    p["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers) if scan else layers
    return p


def rms(w: Any, x: Any) -> Any:
    import jax
    import jax.numpy as jnp

    x32 = x.astype(jnp.float32)
    return w * (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + 1e-5)).astype(x.dtype)


def rope(x: Any, pos: Any, dh: int) -> Any:
    import jax.numpy as jnp
    import numpy as np

    inv = 1.0 / (500000.0 ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    ang = pos.astype(jnp.float32)[..., None] * inv
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[..., None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[..., None, :].astype(x.dtype)
    half = dh // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def layer(s: dict[str, Any], lp: dict[str, Any], x: Any, pos: Any, cache: Any, i: Any, window: int,
          fused: bool) -> tuple[Any, Any]:
    """Layer ``i`` of the decode step: x (S, h), pos (S,), cache (L, 2, S, K, T, dh), written in
    place (a scatter into the whole cache, never a copy of a layer's part)."""
    import jax
    import jax.numpy as jnp

    S = x.shape[0]
    H, K, dh = s["heads"], s["kv"], s["hidden"] // s["heads"]
    G = H // K
    hn = rms(lp["attn_norm"], x)
    if fused:
        qkv = hn @ lp["qkv"].T
        q, k, v = jnp.split(qkv, [H * dh, H * dh + K * dh], axis=-1)
    else:
        q, k, v = hn @ lp["q"].T, hn @ lp["k"].T, hn @ lp["v"].T
    q = rope(q.reshape(S, H, dh), pos, dh).reshape(S, K, G, dh)
    k = rope(k.reshape(S, K, dh), pos, dh)
    v = v.reshape(S, K, dh)
    slots = jnp.arange(S)
    cache = cache.at[i, 0, slots, :, pos].set(k).at[i, 1, slots, :, pos].set(v)
    keys = jax.lax.dynamic_index_in_dim(cache[:, 0, :, :, :window], i, 0, keepdims=False)
    values = jax.lax.dynamic_index_in_dim(cache[:, 1, :, :, :window], i, 0, keepdims=False)
    scores = jnp.einsum("skgd,sktd->skgt", q, keys).astype(jnp.float32) / dh ** 0.5
    visible = jnp.arange(window)[None, None, None, :] <= pos[:, None, None, None]
    w = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(x.dtype)
    a = jnp.einsum("skgt,sktd->skgd", w, values).reshape(S, H * dh)
    x = x + a @ lp["o"].T
    hn = rms(lp["mlp_norm"], x)
    if fused:
        gu = hn @ lp["gate_up"].T
        g, u = jnp.split(gu, 2, axis=-1)
    else:
        g, u = hn @ lp["gate"].T, hn @ lp["up"].T
    return x + (jax.nn.silu(g) * u) @ lp["down"].T, cache


def pick(logits: Any, temp: Any, top_p: Any, key: Any, sample: bool) -> Any:
    import jax
    import jax.numpy as jnp

    if not sample:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    scaled = logits / temp[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    srt = jnp.take_along_axis(scaled, order, -1)
    probs = jax.nn.softmax(srt, -1)
    before = jnp.cumsum(probs, -1) - probs
    srt = jnp.where(before < top_p[:, None], srt, -jnp.inf)
    g = jax.random.gumbel(key, srt.shape, jnp.float32)
    choice = jnp.argmax(srt + g, -1)
    return jnp.take_along_axis(order, choice[:, None], -1)[:, 0].astype(jnp.int32)


def decode_loop(s: dict[str, Any], window: int, fused: bool, scan: bool, sample: bool, steps: int) -> Any:
    import jax
    import jax.numpy as jnp

    def step(p: dict[str, Any], tok: Any, pos: Any, cache: Any, key: Any) -> tuple[Any, Any]:
        x = jnp.take(p["embed"], tok, axis=0)
        if scan:
            def body(carry: Any, i_lp: Any) -> Any:
                x, cache = carry
                i, lp = i_lp
                return layer(s, lp, x, pos, cache, i, window, fused), None

            (x, cache), _ = jax.lax.scan(body, (x, cache), (jnp.arange(s["layers"]), p["layers"]))
        else:
            for i, lp in enumerate(p["layers"]):
                x, cache = layer(s, lp, x, pos, cache, i, window, fused)
        head = p["embed"] if s["tied"] else p["lm_head"]
        logits = (rms(p["norm"], x) @ head.T).astype(jnp.float32)
        temp = jnp.full(tok.shape, 0.8, jnp.float32)
        top_p = jnp.full(tok.shape, 0.9, jnp.float32)
        return pick(logits, temp, top_p, key, sample), cache

    def run(p: dict[str, Any], tok: Any, pos: Any, cache: Any) -> tuple[Any, Any, Any]:
        def body(i: Any, c: Any) -> Any:
            tok, pos, cache = c
            tok, cache = step(p, tok, pos, cache, jax.random.fold_in(jax.random.key(0), i))
            return tok, pos + 1, cache

        return jax.lax.fori_loop(0, steps, body, (tok, pos, cache))

    return jax.jit(run, donate_argnums=3)


def timed(fn: Any, *args: Any, reps: int = 5) -> tuple[float, Any]:
    """Median seconds of ``fn(*args)`` (the first call, compiling, excluded) and its last result."""
    import jax

    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def copy_bandwidth() -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (1 << 30,), jnp.float32)  # 4 GiB
    f = jax.jit(lambda x: x * 1.0001)
    t, _ = timed(f, a)
    return 2 * a.nbytes / t


def decode_case(name: str, s: dict[str, Any], batch: int, max_len: int, used: int, window: int,
                fused: bool, scan: bool, sample: bool, steps: int, bw: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    dh = s["hidden"] // s["heads"]
    p = make_params(s, fused, scan, jax.random.key(0))
    cache_shape = (s["layers"], 2, batch, s["kv"], max_len, dh)
    cache = (0.1 * jax.random.normal(jax.random.key(2), cache_shape, jnp.float32)).astype(jnp.bfloat16)
    tok = jnp.zeros((batch,), jnp.int32)
    pos = jnp.full((batch,), used, jnp.int32)
    fn = decode_loop(s, window, fused, scan, sample, steps)
    t0 = time.perf_counter()
    compiled = fn.lower(p, tok, pos, cache).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(p, tok, pos, cache)
    jax.block_until_ready(out)
    times = []
    for _ in range(5):
        cache = out[2]
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(p, tok, pos, cache))
        times.append(time.perf_counter() - t0)
    times.sort()
    ms = times[2] * 1e3 / steps
    kv_used = s["layers"] * 2 * batch * s["kv"] * (used + steps // 2) * dh * 2
    floor_bytes = weight_bytes(s) + kv_used
    row = {"case": name, "batch": batch, "max_len": max_len, "window": window, "fused": fused,
           "scan": scan, "sample": sample, "ms_per_step": round(ms, 4), "compile_s": round(compile_s, 1),
           "floor_ms_measured_bw": round(floor_bytes / bw * 1e3, 4),
           "floor_ms_4.8TBs": round(floor_bytes / 4.8e12 * 1e3, 4)}
    row["x_floor"] = round(ms / row["floor_ms_measured_bw"], 2)
    del p, cache, out, compiled
    return row


def attention_cases(bw: float) -> list[dict[str, Any]]:
    """Prefill attention of 2048 tokens, and decode attention, alone."""
    import jax
    import jax.numpy as jnp

    rows = []
    T, H, K, dh = 2048, 24, 8, 128
    q = jax.random.normal(jax.random.key(3), (1, T, H, dh), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(4), (1, T, K, dh), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(5), (1, T, K, dh), jnp.bfloat16)
    flops = 4 * T * T * H * dh / 2  # causal

    def einsum_attn(q: Any, k: Any, v: Any) -> Any:
        qg = q.reshape(1, T, K, H // K, dh)
        s_ = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) / dh ** 0.5
        mask = jnp.tril(jnp.ones((T, T), bool))
        w = jax.nn.softmax(jnp.where(mask, s_, -jnp.inf), -1).astype(q.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", w, v).reshape(1, T, H, dh)

    impls = {"einsum": jax.jit(einsum_attn),
             "dpa_xla": jax.jit(partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")),
             "dpa_cudnn": jax.jit(partial(jax.nn.dot_product_attention, is_causal=True,
                                          implementation="cudnn"))}
    ref = None
    for name, fn in impls.items():
        try:
            t, out = timed(fn, q, k, v, reps=20)
            err = None if ref is None else float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            ref = out.astype(jnp.float32) if ref is None else ref
            rows.append({"case": f"prefill_attention_{name}", "ms": round(t * 1e3, 4),
                         "tflops": round(flops / t / 1e12, 1), "max_diff": err})
        except Exception as e:  # noqa: BLE001 - a variant that does not run is a result too
            rows.append({"case": f"prefill_attention_{name}", "error": f"{type(e).__name__}: {e}"[:300]})
    # decode attention: XLA over a window vs Pallas' gqa over the whole cache with lengths
    B, S = 8, 2048
    qd = jax.random.normal(jax.random.key(6), (B, H, dh), jnp.bfloat16)
    kc = jax.random.normal(jax.random.key(7), (B, S, K, dh), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(8), (B, S, K, dh), jnp.bfloat16)
    lens = jnp.full((B,), 100, jnp.int32)
    for W in (128, 2048):
        def xla_dec(q: Any, k: Any, v: Any, lens: Any, W: int = W) -> Any:
            qg = q.reshape(B, K, H // K, dh)
            s_ = jnp.einsum("bkgd,btkd->bkgt", qg, k[:, :W]).astype(jnp.float32) / dh ** 0.5
            vis = jnp.arange(W)[None, None, None] < lens[:, None, None, None]
            w = jax.nn.softmax(jnp.where(vis, s_, -jnp.inf), -1).astype(q.dtype)
            return jnp.einsum("bkgt,btkd->bkgd", w, v[:, :W]).reshape(B, H, dh)

        t, _ = timed(jax.jit(xla_dec), qd, kc, vc, lens, reps=50)
        rows.append({"case": f"decode_attention_xla_window{W}", "ms": round(t * 1e3, 4)})
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as da

        for splits in (4, 16):
            fn = jax.jit(partial(da.gqa, k_splits=splits))
            t, _ = timed(lambda q, k, v, n, fn=fn: fn(q, k, v, kv_seq_len=n), qd, kc, vc, lens, reps=50)
            rows.append({"case": f"decode_attention_pallas_gqa_splits{splits}", "ms": round(t * 1e3, 4)})
    except Exception as e:  # noqa: BLE001
        rows.append({"case": "decode_attention_pallas_gqa", "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def prefill_case(s: dict[str, Any], T: int, attention: str) -> dict[str, Any]:
    """A whole prefill of ``T`` tokens (batch 1): every layer, the logits of the last token."""
    import jax
    import jax.numpy as jnp

    H, K, dh = s["heads"], s["kv"], s["hidden"] // s["heads"]
    p = make_params(s, True, False, jax.random.key(0))

    def attend(q: Any, k: Any, v: Any) -> Any:
        if attention == "einsum":
            qg = q.reshape(1, T, K, H // K, dh)
            sc = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) / dh ** 0.5
            w = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), sc, -jnp.inf), -1)
            return jnp.einsum("bkgts,bskd->btkgd", w.astype(q.dtype), v).reshape(1, T, H * dh)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention
                                            ).reshape(1, T, H * dh)

    def prefill(p: dict[str, Any], ids: Any) -> Any:
        x = jnp.take(p["embed"], ids, axis=0)
        pos = jnp.arange(T)[None]
        for lp in p["layers"]:
            hn = rms(lp["attn_norm"], x)
            q, k, v = jnp.split(hn @ lp["qkv"].T, [H * dh, H * dh + K * dh], axis=-1)
            q = rope(q.reshape(1, T, H, dh), pos, dh)
            k = rope(k.reshape(1, T, K, dh), pos, dh)
            x = x + attend(q, k, v.reshape(1, T, K, dh)) @ lp["o"].T
            hn = rms(lp["mlp_norm"], x)
            g, u = jnp.split(hn @ lp["gate_up"].T, 2, axis=-1)
            x = x + (jax.nn.silu(g) * u) @ lp["down"].T
        head = p["embed"] if s["tied"] else p["lm_head"]
        return (rms(p["norm"], x[:, -1]) @ head.T).astype(jnp.float32)

    ids = jax.random.randint(jax.random.key(9), (1, T), 0, s["vocab"])
    try:
        t, _ = timed(jax.jit(prefill), p, ids, reps=5)
    except Exception as e:  # noqa: BLE001
        return {"case": f"prefill_{T}_{attention}", "error": f"{type(e).__name__}: {e}"[:300]}
    h, f = s["hidden"], s["ff"]
    matmul = 2 * T * s["layers"] * (h * (H + 2 * K) * dh + H * dh * h + 3 * h * f) + 2 * s["vocab"] * h
    attn = 2 * T * T * H * dh * s["layers"]  # causal: half of 4 T^2 H dh
    return {"case": f"prefill_{T}_{attention}", "ms": round(t * 1e3, 3),
            "tflops": round((matmul + attn) / t / 1e12, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="decode_variants.json")
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    import jax

    start = time.perf_counter()
    bw = copy_bandwidth()
    result: dict[str, Any] = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                              "copy_bandwidth_TBs": round(bw / 1e12, 3), "rows": []}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    result["rows"] += attention_cases(bw)
    save()
    cases = [  # (name, shape, batch, max_len, window, fused, scan, sample)
        ("3b_base", "3b", 1, 2048, 2048, False, False, False),
        ("3b_window", "3b", 1, 2048, 128, False, False, False),
        ("3b_window_fused", "3b", 1, 2048, 128, True, False, False),
        ("3b_window_fused_scan", "3b", 1, 2048, 128, True, True, False),
        ("3b_window_fused", "3b", 8, 2048, 128, True, False, False),
        ("3b_base", "3b", 32, 2048, 2048, False, False, False),
        ("3b_window_fused", "3b", 32, 2048, 128, True, False, False),
        ("3b_window_fused_sample", "3b", 32, 2048, 128, True, False, True),
        ("1b_window", "1b", 1, 2048, 128, False, False, False),
        ("1b_window_fused", "1b", 1, 2048, 128, True, False, False),
        ("1b_window_fused_scan", "1b", 1, 2048, 128, True, True, False),
        ("1b_window_fused", "1b", 8, 2048, 128, True, False, False),
        ("1b_window_fused", "1b", 32, 2048, 128, True, False, False),
    ]
    for name, shape, batch, max_len, window, fused, scan, sample in cases:
        if time.perf_counter() - start > args.budget_s:
            result["rows"].append({"case": name, "skipped": "time budget"})
            continue
        try:
            row = decode_case(name, SHAPES[shape], batch, max_len, 16, window, fused, scan, sample,
                              args.steps, bw)
        except Exception as e:  # noqa: BLE001
            row = {"case": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    for attention in ("einsum", "cudnn"):
        if time.perf_counter() - start < args.budget_s + 60:
            result["rows"].append(prefill_case(SHAPES["3b"], 2048, attention))
            print(json.dumps(result["rows"][-1]), flush=True)
            save()
    result["total_s"] = round(time.perf_counter() - start, 1)
    save()
    for r in result["rows"]:
        print(r)


if __name__ == "__main__":
    main()
