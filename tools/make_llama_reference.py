"""Write the Hugging Face reference for dinb's Llama decoder: ``tests/fixtures/llama/reference.npz``.

Runs in the reference environment (torch and transformers on CPU, which dinb never imports)::

    make reference                  # builds .venv-ref, then runs this script (and MiniLM's) in it

The model is ``transformers``' ``LlamaForCausalLM`` built from ``tests/fixtures/llama/config.json``
(4 layers, hidden 256, 8 query heads, 2 key/value heads, vocabulary 512) with the random weights
of ``LlamaDecoder(config=...).init_params(SEED)``: the tests make the same numbers, so no weights
are stored. For each prompt it stores the prompt, the logits of the prefill at every position,
the KV cache after the prefill (``past_key_values``, as ``(layers, 2, kv_heads, tokens,
head_dim)``), and ``STEPS`` greedy decode steps: each step's token and logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dinb.models.llama import LlamaDecoder  # noqa: E402  (numpy only: no JAX needed here)

FIXTURE = ROOT / "tests" / "fixtures" / "llama"
SEED = 0
STEPS = 32
PROMPT_LENGTHS = (11, 5)


def hf_model(config: dict, weights: dict[str, np.ndarray]) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def cache_array(past: object) -> np.ndarray:
    """``(layers, 2, kv_heads, tokens, head_dim)`` of a ``DynamicCache`` (batch 1)."""
    layers = past.layers if hasattr(past, "layers") else None
    pairs = [(la.keys, la.values) for la in layers] if layers is not None else [
        (past.key_cache[i], past.value_cache[i]) for i in range(len(past.key_cache))]
    return np.stack([np.stack([k[0].numpy(), v[0].numpy()]) for k, v in pairs])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = json.loads((FIXTURE / "config.json").read_text())
    weights = LlamaDecoder(config=config).init_params(SEED)
    model = hf_model(config, weights)
    rng = np.random.default_rng(1)
    out: dict[str, np.ndarray] = {"seed": np.array(SEED)}
    with torch.no_grad():
        for i, n in enumerate(PROMPT_LENGTHS):
            prompt = rng.integers(0, config["vocab_size"], n).astype(np.int32)
            res = model(torch.from_numpy(prompt[None].astype(np.int64)), use_cache=True)
            out[f"prompt_{i}"] = prompt
            out[f"prefill_logits_{i}"] = res.logits[0].numpy()
            out[f"cache_{i}"] = cache_array(res.past_key_values)
            past, logits = res.past_key_values, res.logits[0, -1]
            tokens, step_logits = [], []
            for _ in range(STEPS):
                token = int(torch.argmax(logits))
                tokens.append(token)
                res = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, logits = res.past_key_values, res.logits[0, -1]
                step_logits.append(logits.numpy())
            out[f"tokens_{i}"] = np.array(tokens, np.int32)
            out[f"decode_logits_{i}"] = np.stack(step_logits)
            top2 = np.sort(np.concatenate([out[f"prefill_logits_{i}"][-1:], out[f"decode_logits_{i}"]]),
                           axis=-1)[:, -2:]
            print(f"prompt {i} ({n} tokens): greedy {tokens[:8]}..., smallest top-2 gap "
                  f"{float((top2[:, 1] - top2[:, 0]).min()):.4f}")
    out["versions"] = np.array(f"torch {torch.__version__}, transformers {transformers.__version__}")
    np.savez_compressed(FIXTURE / "reference.npz", **out)
    print(f"wrote {FIXTURE / 'reference.npz'}")


if __name__ == "__main__":
    main()
