#!/usr/bin/env python3
"""Reference vectors of the real google/embeddinggemma-300m, computed with the pinned
sentence-transformers in float32 on the CPU, written to tests/fixtures/real/embeddinggemma-300m.json
for tests/real_model.rs.

    scripts/fetch-embeddinggemma.py            # the verified model folder, in a cache
    make real-reference                        # this script in the pinned environment

The cases cover what users send: queries and documents with the model's prompts, no prompt,
Matryoshka sizes 512/256/128, a text longer than the 512-token sliding window, one near the
2,048-token limit and one past it (cut by sentence-transformers to 2,048 tokens, the end dropped),
CJK and emoji, and texts of very different lengths that the test also embeds as one padded batch.
Each vector is computed one text at a time (no padding); the ids the model saw are recorded, and
the script checks that a padded batch gives the same vectors in the reference itself.

The output uses the fixtures' reference format (tests/common: `cases` with `texts`, `token_ids`,
`embeddings`), plus the sha256 of the weights and the versions that produced it.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.23.0",
    "sentence_transformers": "6.2.0",
    "tokenizers": "0.23.3",
    "numpy": "2.4.6",
}


def check_versions() -> None:
    import importlib

    bad = []
    for module, want in PINNED.items():
        have = importlib.import_module(module).__version__.split("+")[0]
        if have != want:
            bad.append(f"{module} {have} (need {want})")
    if bad:
        sys.exit("gen_real_reference.py: wrong versions: " + ", ".join(bad) + ". See scripts/requirements-fixtures.txt.")


check_versions()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "real" / "embeddinggemma-300m.json"
BATCH_TOL = 1e-5

torch.set_num_threads(2)

QUERIES = [
    "what is a vector database?",
    "How do I embed text for semantic search?",
    "向量数据库是什么？",
    "🚀 fastest way to index embeddings 🔍",
]
DOCUMENTS = [
    "A vector database stores embeddings and answers nearest-neighbour queries over them.",
    "Embeddings map text to points in a space where similar meanings lie close together; "
    "a search engine compares a query's embedding with the documents' embeddings.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "Emoji in text: ✅ done, ❌ failed, 🧪 testing, 🎉 released.",
]

SENTENCES = [
    "The index keeps one vector per document and a pointer to the stored text.",
    "Queries arrive one at a time, while documents are loaded in large batches at night.",
    "Cosine similarity between unit vectors is the same as their inner product.",
    "A graph index such as HNSW trades memory for fast approximate search.",
    "Quantized vectors take a quarter of the space at a small cost in recall.",
    "Every shard answers with its best candidates and the router merges the lists.",
    "Long documents are split into passages that each fit the model's window.",
    "The embedding model turns each passage into a vector of fixed length.",
    "Operators watch the latency percentiles and the queue depth on a dashboard.",
    "A reranker reads the top hundred passages again and orders them more carefully.",
    "Filters on metadata narrow the search before the vectors are compared.",
    "When the model changes, every stored vector has to be computed again.",
]


def long_text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(SENTENCES) for _ in range(sentences))


def cases(st: SentenceTransformer):
    tok = st.tokenizer
    n_tokens = lambda t: len(tok(t)["input_ids"])  # noqa: E731
    # Sizes in tokens with the document prompt: past the ±256 window, near the 2,048 limit, past it.
    past_window = long_text(1, 45)
    near_limit = long_text(2, 140)
    over_limit = long_text(3, 220)
    for text, low, high in [(past_window, 520, 1000), (near_limit, 1800, 2040), (over_limit, 2300, 4000)]:
        n = n_tokens("title: none | text: " + text)
        assert low <= n <= high, (n, low, high)
    mixed = ["ok", DOCUMENTS[1], past_window, "多言語の検索 🔎", long_text(4, 12)]
    return [
        dict(name="query", prompt_name="query", dimensions=None, texts=QUERIES),
        dict(name="document", prompt_name="document", dimensions=None, texts=DOCUMENTS),
        dict(name="no prompt", prompt_name=None, dimensions=None, texts=QUERIES[:2] + DOCUMENTS[2:]),
        dict(name="query 512", prompt_name="query", dimensions=512, texts=QUERIES[:2]),
        dict(name="query 256", prompt_name="query", dimensions=256, texts=QUERIES[:2]),
        dict(name="document 128", prompt_name="document", dimensions=128, texts=DOCUMENTS[:2]),
        dict(name="long documents", prompt_name="document", dimensions=None, texts=[past_window, near_limit, over_limit]),
        dict(name="mixed lengths", prompt_name="document", dimensions=None, texts=mixed),
    ]


class IdsRecorder:
    """Records the input_ids the transformer module receives (sentence-transformers calls the
    Hugging Face model's forward directly, so the hook sits on its Transformer module)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(lambda _m, args: self.calls.append(
            (args[0]["input_ids"].clone(), args[0]["attention_mask"].clone())))

    def remove(self):
        self.handle.remove()


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    folder = Path(subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch-embeddinggemma.py")],
                                 check=True, capture_output=True, text=True).stdout.strip())
    st = SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                             model_kwargs={"dtype": torch.float32})
    st.eval()
    assert st.max_seq_length == 2048, st.max_seq_length
    out_cases = []
    for spec in cases(st):
        kw = {"prompt_name": spec["prompt_name"]} if spec["prompt_name"] else {"prompt": ""}
        prompt = st.prompts[spec["prompt_name"]] if spec["prompt_name"] else ""
        rec = IdsRecorder(st[0])
        one = np.concatenate([st.encode([t], batch_size=1, convert_to_numpy=True, **kw) for t in spec["texts"]])
        rec.remove()
        token_ids = []
        for ids, mask in rec.calls:
            assert ids.shape[0] == 1 and bool(mask.all())
            token_ids.append(ids[0].tolist())
        batched = st.encode(spec["texts"], batch_size=len(spec["texts"]), convert_to_numpy=True, **kw)
        diff = float(np.abs(batched - one).max())
        print(f"{spec['name']}: {len(spec['texts'])} texts, tokens {[len(t) for t in token_ids]}, "
              f"batched vs alone max |diff| {diff:.2e}", file=sys.stderr)
        assert diff < BATCH_TOL, diff
        emb = one
        if spec["dimensions"]:
            cut = st.encode(spec["texts"], batch_size=1, convert_to_numpy=True,
                            truncate_dim=spec["dimensions"], normalize_embeddings=True, **kw)
            emb = one[:, : spec["dimensions"]]
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            assert float(np.abs(cut - emb).max()) < 1e-6
        assert np.all(np.isfinite(emb))
        out_cases.append({
            "name": spec["name"],
            "prompt_name": spec["prompt_name"],
            "instruction": None,
            "prompt": prompt,
            "dimensions": spec["dimensions"],
            "texts": spec["texts"],
            "token_ids": token_ids,
            "embeddings": [[float(v) for v in row] for row in emb.astype(np.float32)],
        })
    doc = {
        "model": "google/embeddinggemma-300m",
        "architecture": "gemma3_text",
        "sha256": {name: sha256(folder / name) for name in
                   ["config.json", "model.safetensors", "tokenizer.json", "2_Dense/model.safetensors", "3_Dense/model.safetensors"]},
        "reference": {k: v for k, v in PINNED.items()} | {"dtype": "float32", "device": "cpu"},
        "cases": out_cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
