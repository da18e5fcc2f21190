"""Write tiny Hugging Face decoder folders, one per family dinb reads, and their reference outputs:
``tests/fixtures/hf/<family>/``.

Runs in the reference environment (torch and transformers on CPU, which dinb never imports)::

    make reference                  # builds .venv-ref, then runs this script (and the others) in it

Each folder is what a download of that family looks like, at a few hundred kilobytes: the
weights sharded (``model.safetensors.index.json`` and ``model-0000k-of-0000n.safetensors``) in
bfloat16, ``config.json`` (the ``llama3`` one in transformers 4's form, ``rope_scaling`` and
``rope_theta``, and its chat template in ``tokenizer_config.json``, as most of the Hub's Llama
3.x folders are; the others as transformers writes them now, the template in
``chat_template.jinja``), ``generation_config.json`` (end tokens, default sampling), a ``tokenizer.json`` (a
byte-level BPE trained here) and ``tokenizer_config.json`` with the family's chat format as its
``chat_template``. Beside it, ``reference.npz``: for two prompts, transformers' logits in float32
(the bfloat16 weights widened) at the prefill's last token and at each of ``STEPS`` greedy
decode steps, and the tokens; ``chat.json``: the chat template rendered for two conversations
and the token ids of each, as ``apply_chat_template`` gives them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "hf"
STEPS = 12
PROMPTS = ("The quick brown fox jumps over the lazy dog.", "Pipeline stages hand activations on")
CONVERSATIONS = [
    [{"role": "user", "content": "What is tensor parallelism?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Split a matmul."},
     {"role": "assistant", "content": "By columns."}, {"role": "user", "content": "And then?"}],
]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]"]
TEXT = [
    "Tensor parallelism splits every layer across the ranks, so the ranks talk inside every layer.",
    "Pipeline parallelism cuts the stack of layers into stages that hand activations on.",
    "A decode step reads every weight once; its floor is the bytes over the bandwidth.",
    "The quick brown fox jumps over the lazy dog. What is tensor parallelism? Split a matmul by columns.",
    "You answer briefly. And then? The key and value heads are split or replicated over the ranks.",
] * 4

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
# each family: its config class, what it adds, its special tokens and its chat format
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, tie_word_embeddings=True, head_dim=16,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
        "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"],
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=False),
              None, ["<|im_end|>", "<|endoftext|>"],
              "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
              "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
              "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "qwen3": (transformers.Qwen3Config, dict(rope_theta=1000000.0, tie_word_embeddings=True, head_dim=32),
              None, ["<|im_end|>", "<|endoftext|>"],
              "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
              "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": (transformers.MistralConfig, dict(rope_theta=1000000.0, tie_word_embeddings=False,
                                                 sliding_window=None),
                "<s>", ["</s>"],
                "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "[INST] {{ message['content'] }} [/INST]{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] }}</s>{% else %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"),
}


def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def make(family: str, tok: Tokenizer) -> None:
    cls, extra, bos, eos, template = FAMILIES[family]
    out = OUT / family
    shutil.rmtree(out, ignore_errors=True)
    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    config = cls(**BASE, **extra, vocab_size=vocab, bos_token_id=ids.get(bos) if bos else None,
                 eos_token_id=[ids[t] for t in eos] if len(eos) > 1 else ids[eos[0]])
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="100KB")
    transformers.GenerationConfig(eos_token_id=[ids[t] for t in eos],
                                  bos_token_id=ids.get(bos) if bos else None, do_sample=True,
                                  temperature=0.7, top_p=0.8, top_k=20).save_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos[0],
                                                 pad_token=eos[-1], chat_template=template)
    fast.save_pretrained(out)
    if family == "llama3":  # the Hub's Llama 3.x: transformers 4's rope_scaling + rope_theta
        cfg = json.loads((out / "config.json").read_text())
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = rope.get("rope_theta", extra["rope_theta"])
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} or extra["rope_scaling"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        tok_cfg = json.loads((out / "tokenizer_config.json").read_text())  # and the template in here
        tok_cfg["chat_template"] = (out / "chat_template.jinja").read_text()
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (out / "chat_template.jinja").unlink()
    reference(out, family)


def reference(folder: Path, family: str) -> None:
    """transformers' float32 logits and greedy tokens, and its chat template's renderings."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    arrays: dict[str, np.ndarray] = {}
    for i, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        arrays[f"prompt_{i}"] = np.array(ids, np.int32)
        logits, tokens = [], []
        seq = list(ids)
        with torch.no_grad():
            for _ in range(STEPS + 1):
                out = model(torch.tensor([seq])).logits[0, -1].numpy()
                logits.append(out)
                tokens.append(int(out.argmax()))
                seq.append(tokens[-1])
        arrays[f"logits_{i}"] = np.stack(logits[:STEPS]).astype(np.float32)  # before each new token
        arrays[f"tokens_{i}"] = np.array(tokens[:STEPS], np.int32)
    np.savez_compressed(folder.parent / f"{family}.npz", **arrays, versions=np.array(
        f"torch {torch.__version__}, transformers {transformers.__version__}"))
    chats = [{"text": tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
              "ids": tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)}
             for c in CONVERSATIONS]
    (folder.parent / f"{family}_chat.json").write_text(json.dumps(
        {"conversations": CONVERSATIONS, "rendered": chats}, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    for family in FAMILIES:
        make(family, tok)
        size = sum(p.stat().st_size for p in (OUT / family).iterdir())
        print(f"{family}: {size // 1024} KiB in {OUT / family}")


if __name__ == "__main__":
    main()
