"""Train dinb's tiny adder: a Llama-style decoder that learns to add two numbers below 1000.

    .venv/bin/python tools/train_tiny_decoder.py          # under 2 minutes on 2 CPU cores

It writes ``dinb/models/tiny_adder/``: ``config.json`` (a Hugging Face ``LlamaConfig``),
``model.safetensors`` (Hugging Face names) and ``tokenizer.json`` (one token per character).
The model is :class:`dinb.models.llama.LlamaDecoder` itself, trained in JAX with its own
``forward``: 2 layers, hidden 64, 4 query heads sharing 2 key/value heads, 14 tokens, 125k
parameters. It reaches a loss near 0 after about 1200 steps.

A question is ``"123+045="`` (three digits each), its answer ``"0168"`` (four) then the end
token. The loss is the
cross-entropy of the answer's tokens (the question's are given). Training draws fresh pairs
every step; the accuracy is measured on :data:`QUESTIONS` (:func:`questions`, fixed by seed,
never trained on), greedily, answer and end token exactly right.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dinb.models.llama import LlamaDecoder  # noqa: E402
from dinb.models.tiny_adder import (  # noqa: E402
    CHARS,
    EOS,
    PAD,
    encode,
    question,
    questions,
    tokenizer_json,
)

OUT = ROOT / "dinb" / "models" / "tiny_adder"
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": len(CHARS) + 2, "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32",
    "bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD,
}
SEQ = 13  # "999+999=1998" and the end token


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (n, SEQ) of random sums, and the mask of the answer tokens to predict."""
    a, b = rng.integers(0, 1000, n), rng.integers(0, 1000, n)
    ids = np.full((n, SEQ), PAD, np.int32)
    mask = np.zeros((n, SEQ), np.float32)
    for i in range(n):
        text, answer = question(int(a[i]), int(b[i]))
        q, ans = encode(text), encode(answer) + [EOS]
        ids[i, :len(q) + len(ans)] = q + ans
        mask[i, len(q) - 1:len(q) + len(ans) - 1] = 1  # position t predicts token t + 1
    return ids, mask


def train(steps: int, seed: int, batch_size: int, lr: float) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    model = LlamaDecoder(config=CONFIG, slots=1, max_len=16)
    params = {k: jnp.asarray(v) for k, v in model.init_params(seed).items()}

    def loss_fn(p: dict, ids: jax.Array, mask: jax.Array) -> jax.Array:
        logits = model.forward(p, ids)[:, :-1]
        logp = jax.nn.log_softmax(logits, -1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return -(picked * mask[:, :-1]).sum() / mask.sum()

    @jax.jit
    def step(p: dict, m: dict, v: dict, t: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple:
        loss, g = jax.value_and_grad(loss_fn)(p, ids, mask)
        rate = lr * jnp.minimum(1.0, t / 200) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t / steps, 1.0)))
        m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree.map(lambda a, b: 0.98 * a + 0.02 * b * b, v, g)
        c1, c2 = 1 - 0.9 ** t, 1 - 0.98 ** t
        def update(w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:  # AdamW
            return w - rate * ((a / c1) / (jnp.sqrt(b / c2) + 1e-8) + 0.01 * w)

        p = jax.tree.map(update, p, m, v)
        return p, m, v, loss

    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        ids, mask = batch(rng, batch_size)
        params, m, v, loss = step(params, m, v, jnp.float32(t), ids, mask)
        if t % 250 == 0 or t == steps:
            print(f"step {t:5d}  loss {float(loss):.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    return {k: np.asarray(w) for k, w in params.items()}


def accuracy(weights: dict[str, np.ndarray]) -> float:
    """Greedy answers of :func:`questions` with the plain forward pass (no cache): every prompt
    in one buffer of ``SEQ`` tokens, the next token read after each row's own last one."""
    import jax
    import jax.numpy as jnp

    model = LlamaDecoder(config=CONFIG, slots=1, max_len=16)
    params = {k: jnp.asarray(w) for k, w in weights.items()}
    qs = questions()
    ids = np.full((len(qs), SEQ), PAD, np.int32)
    ends = np.array([len(encode(q)) for q, _ in qs])
    for i, (q, _) in enumerate(qs):
        ids[i, :ends[i]] = encode(q)
    forward = jax.jit(model.forward)
    rows = np.arange(len(qs))
    for k in range(5):
        logits = np.asarray(forward(params, jnp.asarray(ids)))
        ids[rows, ends + k] = logits[rows, ends + k - 1].argmax(-1)
    return float(np.mean([list(ids[i, ends[i]:ends[i] + len(a) + 1]) == encode(a) + [EOS]
                          for i, (_, a) in enumerate(qs)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--hidden", type=int, default=CONFIG["hidden_size"])
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--ffn", type=int, default=CONFIG["intermediate_size"])
    args = parser.parse_args()
    CONFIG.update(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.ffn)
    t0 = time.perf_counter()
    weights = train(args.steps, args.seed, args.batch, args.lr)
    acc = accuracy(weights)
    print(f"trained in {time.perf_counter() - t0:.0f} s; accuracy on the {len(questions())} fixed questions: "
          f"{acc:.1%}")
    from dinb.formats.safetensors import write_file

    args.out.mkdir(parents=True, exist_ok=True)
    write_file(args.out / "model.safetensors", weights, {"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (args.out / "tokenizer.json").write_text(tokenizer_json())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
