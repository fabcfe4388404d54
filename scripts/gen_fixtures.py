#!/usr/bin/env python3
"""Generate the reference fixtures for the Rust embedding service's parity tests.

Everything is written under ``tests/fixtures/`` (relative to the repository root):

* ``qwen3-tiny/``     Qwen3Model (model_type ``qwen3``) in the sentence-transformers layout of
                      Qwen/Qwen3-Embedding-0.6B: bf16 ``model.safetensors`` without ``model.``
                      prefix, tokenizer whose post-processor appends ``<|endoftext|>``, last-token
                      pooling, Normalize, ``query``/``document`` prompts.
* ``gemma-tiny/``     Gemma3TextModel (model_type ``gemma3_text``) in the EmbeddingGemma layout: f32
                      weights, bidirectional attention with a tiny sliding window on off-pattern
                      layers, mean pooling, two Dense layers, Normalize, EmbeddingGemma's prompts.
* ``qwen3-tiny-q4/``  mlx-lm-converted-style Qwen3 folder: 4-bit affine quantization (group 32) of
                      every layer Linear and of ``embed_tokens``, ``model.`` key prefix, two shards +
                      index, tokenizer without an EOS post-processor (the service appends EOS).
* ``qwen3-tiny-q8/``  Same with 8 bits, group 64, one unsharded file.

Each folder holds ``reference.json``::

    {"architecture": "qwen3" | "gemma3_text",
     "cases": [{"name", "prompt_name", "instruction", "prompt", "dimensions",
                "texts", "token_ids", "embeddings"}]}

``token_ids`` are the ids of ``prompt + text`` exactly as the reference model saw them (special
tokens included; for q4/q8 including the manually appended EOS). ``embeddings`` are float32 values
written with full precision (shortest repr that round-trips).

The references are computed in float32 on CPU, one text at a time (no padding), with
sentence-transformers ``encode`` for the sentence-transformers folders and with a plain
transformers ``Qwen3Model`` (dequantized weights, EOS appended, last-token pooling, L2 normalize)
for the quantized folders. The script then asserts that
  (a) batched encoding equals one-by-one encoding,
  (b) left padding equals right padding,
  (c) the ids the reference model received equal the raw ``tokenizer.json`` ids
      (``tokenizers.Tokenizer.from_file(...).encode(text, add_special_tokens=True)``), which is
      what the Rust service uses,
  (d) eager attention equals the default (sdpa) attention,
and prints how far some typical implementation mistakes move the vectors (they must move them
clearly, otherwise the fixture would not catch them).

Pinned versions (the script refuses to run with others, since the fixtures are only meaningful
for the reference implementation they were computed with):
    torch 2.15.0, transformers 5.23.0, sentence-transformers 6.2.0, tokenizers 0.23.3,
    safetensors 0.8.0, numpy 2.4.6
See scripts/requirements-fixtures.txt.

Usage:  python scripts/gen_fixtures.py      (deterministic: fixed seeds, no network access)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.23.0",
    "sentence_transformers": "6.2.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}


def check_versions() -> None:
    import importlib

    bad = []
    for module, want in PINNED.items():
        have = importlib.import_module(module).__version__.split("+")[0]  # torch has a +cuXXX/+cpu tail
        if have != want:
            bad.append(f"{module} {have} (need {want})")
    if bad:
        sys.exit("gen_fixtures.py: wrong versions: " + ", ".join(bad) + ". See scripts/requirements-fixtures.txt.")


check_versions()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel, Qwen3Config, Qwen3Model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MAX_FIXTURE_BYTES = 2 * 1024 * 1024
TOL = 1e-5  # batched vs one-by-one, left vs right padding, eager vs sdpa

torch.set_num_threads(4)  # fixed thread count: keeps CPU reductions reproducible between runs
transformers.utils.logging.disable_progress_bar()

# --------------------------------------------------------------------------------------------
# Texts and prompts
# --------------------------------------------------------------------------------------------

TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "first line\nsecond line after a newline",
    "向量数据库中的嵌入",
    "🚀✨ embeddings 🎉",
    "Mixed: Rust 编程 and vectors, 42 tokens — ok?",
    # Long texts: 60-120 tokens, far longer than Gemma's ±3 sliding window.
    "Semantic search systems turn every document into a dense vector, store those vectors in an "
    "index, and answer a query by embedding it the same way and returning the nearest neighbours. "
    "Quality depends on the model, the pooling strategy and careful normalization of each vector.",
    "长文本测试: a retrieval service must handle long inputs gracefully 🚀 including 中文字符, emoji ✨ "
    "and numbers like 3.14159 or 2048, because users paste whole paragraphs,\nline breaks "
    "and all, into the search box.",
]
LONG_TEXT_INDICES = (6, 7)
INSTRUCTION_TASK = "Find code snippets"

QWEN_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
QWEN_PROMPTS = {"query": QWEN_QUERY_PROMPT, "document": ""}

# EmbeddingGemma's config_sentence_transformers.json prompts (google/embeddinggemma-300m).
GEMMA_PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}


def qwen_instruction_prompt(task: str) -> str:
    return f"Instruct: {task}\nQuery:"  # no space after "Query:" (Qwen3-Embedding's format)


def gemma_instruction_prompt(task: str) -> str:
    return f"task: {task} | query: "


# --------------------------------------------------------------------------------------------
# Tiny tokenizers
# --------------------------------------------------------------------------------------------

# Small training corpus: English, some CJK and emoji so that multi-byte merges exist. Some of the
# test characters (e.g. 🎉, 嵌, 编) are deliberately rare or absent so that the Qwen tokenizer emits
# partial-UTF-8 byte tokens and the Gemma tokenizer falls back to <0xNN> byte tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to dense vectors for semantic search and retrieval.",
    "A vector database stores embeddings and answers nearest neighbour queries.",
    "Given a web search query, retrieve relevant passages that answer the query.",
    "Instruct: find the passages.\nQuery: what is a sentence embedding?",
    "task: search result | query: how do transformers work?",
    "title: none | text: the model reads the text and returns a vector.",
    "Normalization makes every vector unit length, so cosine similarity is a dot product.",
    "Rust services load tokenizers and weights, then run the model on the device.",
    "Long documents are split into tokens; each token attends to its neighbours.",
    "The river bank is near the old mill, and the dog sleeps in the sun.",
    "Numbers like 1, 2, 3, 42 and 2048 appear in code, tables and prose.",
    "Users paste whole paragraphs into the search box, with line breaks and all.",
    "向量数据库存储向量。",
    "数据库中的数据很多。",
    "中文文本和英文文本一起测试。",
    "我们测试长文本和短文本。",
    "🚀 launch the service ✨ and enjoy 🚀",
    "hello world 👋 hello again",
]


def train_qwen_tokenizer(append_eos: bool) -> Tokenizer:
    """Byte-level BPE like Qwen2/Qwen3 (same pre-tokenizer regex, NFC normalizer).

    Specials are added after training so that, as in the real Qwen vocab, they get the highest ids.
    append_eos=True: variant A (Qwen3-Embedding) whose post-processor appends <|endoftext|>.
    append_eos=False: variant B (mlx-lm converted LLM folders): ByteLevel post-processor that adds
    nothing, so the service must append <|endoftext|> itself.
    """
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=560, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if append_eos:
        eos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0",
            pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3 as in Gemma 3


def train_gemma_tokenizer() -> Tokenizer:
    """SentencePiece-style BPE like Gemma 3: " " -> "▁" normalizer, no pre-tokenizer, byte fallback.

    The trainer knows nothing about <0xNN> tokens, so the trained vocab is rebuilt as
    <pad>=0 <eos>=1 <bos>=2 <unk>=3, <0x00>..<0xFF>=4..259 (plain vocab entries, not added tokens,
    as in Gemma), then the trained pieces. Merges refer to strings, so they stay valid.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=450, special_tokens=GEMMA_SPECIALS, limit_alphabet=90, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)

    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = [GEMMA_SPECIALS[i] for i in range(4)] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in trained if p not in GEMMA_SPECIALS and p not in pieces]
    spec["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0 <eos>:0",
        pair="<bos>:0 $A:0 <eos>:0 $B:1 <eos>:1",
        special_tokens=[("<bos>", 2), ("<eos>", 1)],
    )
    return tok


def added_tokens_decoder(tok: Tokenizer) -> dict:
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# tokenizer_class: transformers 5 maps "Qwen2Tokenizer"/"GemmaTokenizer" to model-specific classes
# that rebuild normalizer/pre-tokenizer/post-processor from their own defaults instead of using
# tokenizer.json verbatim. The generic class keeps tokenizer.json exactly as the Rust crate sees it.
GENERIC_TOKENIZER_CLASS = "TokenizersBackend"


def write_qwen_tokenizer(folder: Path, tok: Tokenizer, padding_side: str) -> None:
    tok.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder(tok),
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",  # as in Qwen3: eos is <|im_end|>, pad is <|endoftext|>
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "padding_side": padding_side,
            "split_special_tokens": False,
            "tokenizer_class": GENERIC_TOKENIZER_CLASS,
            "unk_token": None,
        },
    )
    write_json(
        folder / "special_tokens_map.json",
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    )


def write_gemma_tokenizer(folder: Path, tok: Tokenizer) -> None:
    tok.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": True,
            "added_tokens_decoder": added_tokens_decoder(tok),
            "bos_token": "<bos>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<eos>",
            "model_max_length": 2048,
            "pad_token": "<pad>",
            "padding_side": "right",
            "tokenizer_class": GENERIC_TOKENIZER_CLASS,
            "unk_token": "<unk>",
        },
    )
    write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    )


# --------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int, norm_low: float, norm_high: float, std: float) -> None:
    """Overwrite every parameter: norms uniform in [norm_low, norm_high], everything else N(0, std).

    Norm weights far from their defaults catch "w vs 1+w" and missing-norm mistakes; a large std
    makes the vectors sensitive to any deviation.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * (norm_high - norm_low) + norm_low)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def round_to_bf16(model: torch.nn.Module) -> None:
    """Make every weight exactly representable in bf16 (the checkpoint dtype), but keep f32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def qwen_config(vocab_size: int, eos_id: int, **overrides) -> Qwen3Config:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # 4 x 24 = 96 != hidden 64
        intermediate_size=96,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    cfg = Qwen3Config(**kwargs)
    cfg.architectures = ["Qwen3Model"]
    return cfg


def gemma_config(vocab_size: int) -> Gemma3TextConfig:
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        # transformers validates hidden % heads == 0, so with EmbeddingGemma's 3 heads the hidden
        # size is 48 (not 64); 3 x 32 = 96 != 48 still differs from hidden.
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=96,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=20,  # != head_dim: scale is 20^-0.5, not 32^-0.5
        # Off-pattern: the legacy "every 6th layer is full" pattern would make all 4 layers sliding.
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        sliding_window=6,  # bidirectional: |i - j| <= 3
        use_bidirectional_attention=True,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attention_bias=False,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["Gemma3TextModel"]
    return cfg


def build_model(cls, cfg, seed: int, norm_range: tuple[float, float], std: float, attn: str = "sdpa"):
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    randomize(model, seed, *norm_range, std)
    return model


def state_dict_numpy(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    # Tied embeddings: Qwen3Model / Gemma3TextModel have no lm_head, so no duplicates to drop.
    return {prefix + k: v.detach().to(torch.float32).numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# MLX-style affine quantization
# --------------------------------------------------------------------------------------------


def to_bf16_f32(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def quantize_affine(w: np.ndarray, bits: int, group: int):
    """Per row, per group of `group` consecutive inputs: scale=(max-min)/(2^bits-1), bias=min.

    Scales and biases are rounded to bf16 *before* computing q, so the stored bf16 values are
    exactly the ones used. Returns (packed uint32 [out, in*bits/32], scales, biases [out, in/group]
    as f32 holding bf16-exact values, dequantized f32 weight).
    """
    out_f, in_f = w.shape
    assert in_f % group == 0 and (32 % bits) == 0, (w.shape, bits, group)
    levels = (1 << bits) - 1
    g = w.reshape(out_f, in_f // group, group).astype(np.float32)
    wmin, wmax = g.min(axis=2), g.max(axis=2)
    scale = (wmax - wmin) / levels
    scale = np.where(scale == 0, np.float32(1.0), scale)  # constant group: any scale works, q = 0
    scale, bias = to_bf16_f32(scale), to_bf16_f32(wmin)
    q = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, levels).astype(np.uint32)
    deq = (scale[..., None] * q.astype(np.float32) + bias[..., None]).reshape(out_f, in_f).astype(np.float32)

    per_word = 32 // bits
    q = q.reshape(out_f, in_f // per_word, per_word)
    packed = np.zeros((out_f, in_f // per_word), dtype=np.uint32)
    for j in range(per_word):  # value j of a word lives in bits j*bits .. (j+1)*bits-1
        packed |= q[:, :, j] << np.uint32(j * bits)
    return packed, scale, bias, deq


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(folder / f)))
    return tensors


def dequantize_folder(folder: Path, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Independent reader of an mlx-style folder, following MODELS.md: a module is quantized when
    `<path>.scales` exists; value = scale * q + bias; keys lose their `model.` prefix."""
    raw = load_folder_tensors(folder)
    out = {}
    for key, t in raw.items():
        if key.endswith((".scales", ".biases")):
            continue
        path = key.removesuffix(".weight")
        if path + ".scales" in raw:
            q = unpack(t.to(torch.int64).numpy().astype(np.uint32), bits).astype(np.float32)
            scales = raw[path + ".scales"].float().numpy()
            biases = raw[path + ".biases"].float().numpy()
            q = q.reshape(q.shape[0], -1, group)
            w = (scales[..., None] * q + biases[..., None]).reshape(q.shape[0], -1)
            t = torch.from_numpy(w.astype(np.float32))
        out[key.removeprefix("model.")] = t.float()
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    fields = [(packed >> np.uint32(j * bits)) & mask for j in range(per_word)]
    return np.stack(fields, axis=-1).reshape(packed.shape[0], -1)


QUANTIZED_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def is_quantized_module(path: str) -> bool:
    return path == "embed_tokens" or path.endswith(QUANTIZED_SUFFIXES)


# --------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------


def l2n(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mrl(full: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka: cut the full normalized vector, then renormalize."""
    return l2n(full[:, :dim])


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class IdsRecorder:
    """Forward pre-hook recording the input_ids / attention_mask the transformer really receives.

    Hooked on sentence-transformers' Transformer module (its features dict), because that module
    calls the Hugging Face model's ``.forward`` directly, which bypasses hooks on the model itself.
    """

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        features = args[0]
        self.calls.append((features["input_ids"].detach().clone(), features["attention_mask"].detach().clone()))

    def remove(self):
        self.handle.remove()


def load_st(folder: Path, attn: str = "sdpa") -> SentenceTransformer:
    st = SentenceTransformer(
        str(folder),
        device="cpu",
        local_files_only=True,
        model_kwargs={"dtype": torch.float32, "attn_implementation": attn},
    )
    st.eval()
    for p in st.parameters():
        assert p.dtype == torch.float32, p.dtype
    return st


def raw_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=True).ids


def st_cases(st: SentenceTransformer, st_eager: SentenceTransformer, raw: Tokenizer, case_specs, report):
    """Reference cases for a sentence-transformers folder, with checks (a)-(d)."""
    cases = []
    for spec in case_specs:
        kw = {"prompt_name": spec["prompt_name"]} if spec["prompt_name"] else {"prompt": spec["prompt"]}
        prompt = spec["prompt"]

        # One text at a time: no padding anywhere.
        rec = IdsRecorder(st[0])
        one = np.concatenate([st.encode([t], batch_size=1, convert_to_numpy=True, **kw) for t in TEXTS])
        rec.remove()
        assert len(rec.calls) == len(TEXTS)
        token_ids = []
        for text, (ids, mask) in zip(TEXTS, rec.calls):
            assert ids.shape[0] == 1 and bool(mask.all()), "one-by-one input must be unpadded"
            ids = ids[0].tolist()
            # (c) the reference model's ids == raw tokenizer.json ids
            assert ids == raw_ids(raw, prompt + text), (spec["name"], text, ids, raw_ids(raw, prompt + text))
            token_ids.append(ids)

        # (a)+(b) batched, with both padding sides
        pad_side0 = st.tokenizer.padding_side
        for side in ("left", "right"):
            st.tokenizer.padding_side = side
            rec = IdsRecorder(st[0])
            batched = st.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True, **kw)
            rec.remove()
            (_, mask), = rec.calls  # one padded batch, padded on the requested side
            assert not bool(mask[:, -1 if side == "right" else 0].all())
            report(f"{spec['name']}: batched ({side} padding) vs one-by-one", max_diff(batched, one))
        st.tokenizer.padding_side = pad_side0

        # (d) eager attention
        eager = np.concatenate([st_eager.encode([t], batch_size=1, convert_to_numpy=True, **kw) for t in TEXTS])
        report(f"{spec['name']}: eager vs sdpa", max_diff(eager, one))

        emb = one
        if spec["dimensions"]:
            emb = mrl(one, spec["dimensions"])
            st_trunc = st.encode(TEXTS, batch_size=1, convert_to_numpy=True, truncate_dim=spec["dimensions"],
                                 normalize_embeddings=True, **kw)
            report(f"{spec['name']}: ST truncate_dim vs cut+renormalize", max_diff(st_trunc, emb))
        cases.append(make_case(spec, token_ids, emb))
    return cases


def make_case(spec, token_ids, emb) -> dict:
    emb = np.asarray(emb, dtype=np.float32)
    assert np.all(np.isfinite(emb))
    return {
        "name": spec["name"],
        "prompt_name": spec["prompt_name"],
        "instruction": spec["instruction"],
        "prompt": spec["prompt"],
        "dimensions": spec["dimensions"],
        "texts": TEXTS,
        "token_ids": token_ids,
        # float(np.float32) is exact; json writes the shortest repr that round-trips.
        "embeddings": [[float(v) for v in row] for row in emb],
    }


def case_spec(name, prompt, prompt_name=None, instruction=None, dimensions=None) -> dict:
    return {"name": name, "prompt_name": prompt_name, "instruction": instruction, "prompt": prompt,
            "dimensions": dimensions}


def last_token_encode(model: Qwen3Model, seqs: list[list[int]], pad_id: int, side: str) -> np.ndarray:
    """Manual Qwen3 embedding: pad, run, take the last *real* token (by mask), L2 normalize."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    positions = torch.arange(length).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    pooled = hidden[torch.arange(len(seqs)), last]
    return l2n(pooled.numpy())


# --------------------------------------------------------------------------------------------
# Fixture writers
# --------------------------------------------------------------------------------------------


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_reference(folder: Path, architecture: str, cases: list[dict]) -> None:
    (folder / "reference.json").write_text(
        json.dumps({"architecture": architecture, "cases": cases}, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def write_config(folder: Path, cfg, dtype: str) -> dict:
    cfg.dtype = dtype
    cfg.save_pretrained(str(folder))
    return json.loads((folder / "config.json").read_text())


def assert_token_lengths(tok: Tokenizer, label: str) -> None:
    lengths = [len(raw_ids(tok, t)) for t in TEXTS]
    print(f"  {label} token counts: {lengths}")
    for i in LONG_TEXT_INDICES:
        assert 60 <= lengths[i] <= 120, (label, i, lengths[i])


def gen_qwen3_tiny(report) -> None:
    folder = fresh_dir(FIXTURES / "qwen3-tiny")
    tok = train_qwen_tokenizer(append_eos=True)
    eos_id = tok.token_to_id("<|endoftext|>")
    assert_token_lengths(tok, "qwen (A)")
    write_qwen_tokenizer(folder, tok, padding_side="left")  # Qwen3-Embedding pads on the left

    cfg = qwen_config(tok.get_vocab_size(), eos_id)
    model = build_model(Qwen3Model, cfg, seed=1234, norm_range=(0.3, 2.0), std=0.15)
    round_to_bf16(model)
    write_config(folder, cfg, "bfloat16")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_torch(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write_json(folder / "1_Pooling" / "config.json", pooling_config(cfg.hidden_size, "lasttoken"))
    write_json(folder / "config_sentence_transformers.json", {
        "prompts": QWEN_PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})

    specs = [
        case_spec("plain", ""),
        case_spec("query", QWEN_QUERY_PROMPT, prompt_name="query"),
        case_spec("document", "", prompt_name="document"),
        case_spec("instruction", qwen_instruction_prompt(INSTRUCTION_TASK), instruction=INSTRUCTION_TASK),
        case_spec("mrl", "", dimensions=32),
    ]
    st, st_eager = load_st(folder), load_st(folder, attn="eager")
    assert st.tokenizer.padding_side == "left"
    cases = st_cases(st, st_eager, tok, specs, report)
    for case in cases:  # the post-processor really appended EOS
        assert all(ids[-1] == eos_id for ids in case["token_ids"])

    # Mistakes the fixture must catch.
    plain = np.array(cases[0]["embeddings"], dtype=np.float32)
    no_eos = last_token_encode(st[0].auto_model, [raw_ids(tok, t)[:-1] for t in TEXTS], eos_id, "right")
    report("sensitivity qwen3-tiny: EOS not appended", max_diff(no_eos, plain), must_exceed=0.04)
    hf = st[0].auto_model
    saved = [(layer.self_attn.q_norm, layer.self_attn.k_norm) for layer in hf.layers]
    for layer in hf.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    no_qk_norm = np.concatenate([last_token_encode(hf, [ids], eos_id, "right") for ids in cases[0]["token_ids"]])
    for layer, (qn, kn) in zip(hf.layers, saved):
        layer.self_attn.q_norm, layer.self_attn.k_norm = qn, kn
    report("sensitivity qwen3-tiny: missing q_norm/k_norm", max_diff(no_qk_norm, plain), must_exceed=0.04)
    write_reference(folder, "qwen3", cases)


def pooling_config(dim: int, mode: str) -> dict:
    # The legacy key layout used by the published checkpoints (what the Rust service must parse).
    return {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": mode == "lasttoken",
        "include_prompt": True,
    }


def gemma_manual_encode(model: Gemma3TextModel, dense: list[np.ndarray], seqs: list[list[int]]) -> np.ndarray:
    """EmbeddingGemma head by hand (mean over real tokens -> Dense -> Dense -> L2), one text at a time."""
    out = []
    for s in seqs:
        with torch.no_grad():
            h = model(input_ids=torch.tensor([s])).last_hidden_state[0].numpy()
        v = h.mean(axis=0)
        for w in dense:
            v = w @ v
        out.append(v)
    return l2n(np.stack(out))


def assert_gemma_attention_pattern(cfg: Gemma3TextConfig, state: dict, ids: list[int]) -> None:
    """Document what transformers really does: config sliding_window 6 in bidirectional mode means
    token i sees j iff |i - j| <= 3 on sliding layers; full layers see everything."""
    cfg = Gemma3TextConfig.from_dict(cfg.to_dict())
    cfg._attn_implementation = "eager"  # only eager returns attention probabilities
    model = Gemma3TextModel(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    i, j = np.meshgrid(np.arange(len(ids)), np.arange(len(ids)), indexing="ij")
    for layer_type, probs in zip(cfg.layer_types, attentions):
        allowed = (probs[0] > 0).numpy()  # [heads, L, L]
        expected = np.abs(i - j) <= 3 if layer_type == "sliding_attention" else np.ones_like(allowed[0])
        assert all(np.array_equal(a, expected) for a in allowed), layer_type


def gen_gemma_tiny(report) -> None:
    folder = fresh_dir(FIXTURES / "gemma-tiny")
    tok = train_gemma_tokenizer()
    assert_token_lengths(tok, "gemma")
    write_gemma_tokenizer(folder, tok)

    cfg = gemma_config(tok.get_vocab_size())
    model = build_model(Gemma3TextModel, cfg, seed=5678, norm_range=(-0.6, 1.0), std=0.15)
    written = write_config(folder, cfg, "float32")
    assert written["sliding_window"] == 6, written["sliding_window"]
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_torch(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    gen = torch.Generator().manual_seed(91011)
    hidden, mid = cfg.hidden_size, 128
    dense = [(torch.randn((mid, hidden), generator=gen) * 0.15).numpy(),
             (torch.randn((hidden, mid), generator=gen) * 0.15).numpy()]
    for i, w in enumerate(dense):
        sub = folder / f"{i + 2}_Dense"
        write_json(sub / "config.json", {"in_features": w.shape[1], "out_features": w.shape[0], "bias": False,
                                         "activation_function": "torch.nn.modules.linear.Identity"})
        save_numpy({"linear.weight": np.ascontiguousarray(w, dtype=np.float32)}, str(sub / "model.safetensors"))

    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write_json(folder / "1_Pooling" / "config.json", pooling_config(hidden, "mean"))
    write_json(folder / "config_sentence_transformers.json", {
        "prompts": GEMMA_PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})

    specs = [
        case_spec("plain", ""),
        case_spec("query", GEMMA_PROMPTS["query"], prompt_name="query"),
        case_spec("document", GEMMA_PROMPTS["document"], prompt_name="document"),
        case_spec("sts", GEMMA_PROMPTS["STS"], prompt_name="STS"),
        case_spec("instruction", gemma_instruction_prompt(INSTRUCTION_TASK), instruction=INSTRUCTION_TASK),
        case_spec("mrl", "", dimensions=32),
    ]
    st, st_eager = load_st(folder), load_st(folder, attn="eager")
    cases = st_cases(st, st_eager, tok, specs, report)
    for case in cases:
        assert all(ids[0] == 2 and ids[-1] == 1 for ids in case["token_ids"])  # <bos> ... <eos>
    byte_tokens = {i for case in cases for ids in case["token_ids"] for i in ids if 4 <= i < 260}
    assert byte_tokens, "no byte-fallback token exercised"

    # The hand-written pipeline reproduces ST, so the variants below measure only the mistake.
    plain = np.array(cases[0]["embeddings"], dtype=np.float32)
    seqs = [raw_ids(tok, t) for t in TEXTS]
    state = model.state_dict()
    assert_gemma_attention_pattern(cfg, state, seqs[6])
    report("gemma-tiny: manual head vs ST", max_diff(gemma_manual_encode(model, dense, seqs), plain))

    def variant(label, threshold=0.04, **changes):
        vcfg = gemma_config(tok.get_vocab_size())
        for k, v in changes.items():
            setattr(vcfg, k, v)
        vcfg._attn_implementation = "eager"
        vmodel = Gemma3TextModel(vcfg).eval()
        vmodel.load_state_dict(state)
        report(f"sensitivity gemma-tiny: {label}", max_diff(gemma_manual_encode(vmodel, dense, seqs), plain),
               must_exceed=threshold)

    variant("causal mask", use_bidirectional_attention=False)
    variant("no sliding window", layer_types=["full_attention"] * 4)
    variant("window |i-j| < 6 instead of <= 3", sliding_window=6)
    variant("layer types from the 1-in-6 pattern", layer_types=["sliding_attention"] * 4)
    variant("head_dim^-0.5 instead of query_pre_attn_scalar^-0.5", query_pre_attn_scalar=32)

    # "w instead of 1+w": shift every norm weight by -1 so that (1 + w') equals the original w.
    state_w = {k: (v - 1.0 if "norm" in k else v) for k, v in state.items()}
    vmodel = Gemma3TextModel(gemma_config(tok.get_vocab_size())).eval()
    vmodel.load_state_dict(state_w)
    report("sensitivity gemma-tiny: norms as w instead of 1+w",
           max_diff(gemma_manual_encode(vmodel, dense, seqs), plain), must_exceed=0.04)
    vmodel.load_state_dict(state)
    vmodel.embed_tokens.embed_scale.fill_(1.0)
    report("sensitivity gemma-tiny: missing sqrt(hidden) embedding scale",
           max_diff(gemma_manual_encode(vmodel, dense, seqs), plain), must_exceed=0.04)
    write_reference(folder, "gemma3_text", cases)


def gen_qwen3_quantized(report, name: str, bits: int, group: int, shards: int, seed: int, **cfg_overrides) -> None:
    folder = fresh_dir(FIXTURES / name)
    tok = train_qwen_tokenizer(append_eos=False)
    eos_id = tok.token_to_id("<|endoftext|>")
    write_qwen_tokenizer(folder, tok, padding_side="right")  # LLM folders pad right; pooling is by mask

    cfg = qwen_config(tok.get_vocab_size(), eos_id, **cfg_overrides)
    model = build_model(Qwen3Model, cfg, seed=seed, norm_range=(0.3, 2.0), std=0.15)
    round_to_bf16(model)

    # Quantize; keep the dequantized weights to load into the reference model.
    tensors: dict[str, np.ndarray] = {}
    dequant: dict[str, torch.Tensor] = {}
    for key, w in state_dict_numpy(model).items():
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and is_quantized_module(path):
            packed, scales, biases, deq = quantize_affine(w, bits, group)
            assert np.array_equal(unpack(packed, bits),
                                  np.rint((deq.reshape(w.shape[0], -1, group) - biases[..., None])
                                          / scales[..., None]).reshape(w.shape).astype(np.uint32))
            tensors[f"model.{path}.weight"] = packed
            tensors[f"model.{path}.scales"] = scales
            tensors[f"model.{path}.biases"] = biases
            dequant[key] = torch.from_numpy(deq)
        else:
            tensors[f"model.{key}"] = w  # norms stay unquantized (bf16 in the file)
            dequant[key] = torch.from_numpy(w)
    model.load_state_dict(dequant)
    save_sharded(folder, tensors, shards)

    # mlx-lm copies the hub config dict (legacy "rope_theta", "torch_dtype") and adds quantization.
    config = mlx_style_config(cfg, bits, group)
    write_json(folder / "config.json", config)
    reloaded = Qwen3Config.from_pretrained(str(folder))
    assert reloaded.rope_parameters["rope_theta"] == cfg.rope_parameters["rope_theta"]

    # The HF tokenizer on this folder must agree with tokenizer.json (no EOS added by either).
    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == raw_ids(tok, text)

    specs = [
        case_spec("plain", ""),
        case_spec("instruction", qwen_instruction_prompt(INSTRUCTION_TASK), instruction=INSTRUCTION_TASK),
        case_spec("mrl", "", dimensions=32),
    ]
    eager = Qwen3Model(cfg_with_attn(cfg, "eager")).eval()
    eager.load_state_dict(dequant)
    cases = []
    for spec in specs:
        seqs = [raw_ids(tok, spec["prompt"] + t) + [eos_id] for t in TEXTS]  # EOS appended by hand
        assert all(eos_id not in s[:-1] for s in seqs)
        one = np.concatenate([last_token_encode(model, [s], eos_id, "right") for s in seqs])
        for side in ("left", "right"):
            report(f"{name} {spec['name']}: batched ({side} padding) vs one-by-one",
                   max_diff(last_token_encode(model, seqs, eos_id, side), one))
        report(f"{name} {spec['name']}: eager vs sdpa",
               max_diff(np.concatenate([last_token_encode(eager, [s], eos_id, "right") for s in seqs]), one))
        emb = mrl(one, spec["dimensions"]) if spec["dimensions"] else one
        cases.append(make_case(spec, seqs, emb))

    # Rebuild the model from the files on disk (as the service will) and recompute the plain case.
    plain = np.array(cases[0]["embeddings"], dtype=np.float32)
    from_disk = Qwen3Model(cfg_with_attn(Qwen3Config.from_pretrained(str(folder)), "sdpa")).eval()
    from_disk.load_state_dict(dequantize_folder(folder, bits, group))
    again = np.concatenate([last_token_encode(from_disk, [s], eos_id, "right") for s in cases[0]["token_ids"]])
    report(f"{name}: model rebuilt from the quantized files vs reference", max_diff(again, plain))

    no_eos = last_token_encode(model, [raw_ids(tok, t) for t in TEXTS], eos_id, "right")
    report(f"sensitivity {name}: EOS not appended", max_diff(no_eos, plain), must_exceed=0.04)
    write_reference(folder, "qwen3", cases)


def cfg_with_attn(cfg, attn: str):
    new = Qwen3Config.from_dict(cfg.to_dict())
    new._attn_implementation = attn
    return new


def mlx_style_config(cfg: Qwen3Config, bits: int, group: int) -> dict:
    config = json.loads(cfg.to_json_string())  # what save_pretrained writes (non-default keys)
    rope = config.pop("rope_parameters")
    assert rope == {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}, rope
    config.pop("dtype", None)
    config.update({
        "architectures": ["Qwen3ForCausalLM"],
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "quantization": {"group_size": group, "bits": bits, "mode": "affine"},
        "quantization_config": {"group_size": group, "bits": bits, "mode": "affine"},
    })
    return dict(sorted(config.items()))


def to_safetensors_dict(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if v.dtype == np.uint32:
            out[k] = torch.from_numpy(v.astype(np.int64)).to(torch.uint32).contiguous()
        else:  # every float tensor of an mlx bf16 checkpoint is bf16 (values already bf16-exact)
            out[k] = torch.from_numpy(v).to(torch.bfloat16).contiguous()
    return out


def save_sharded(folder: Path, tensors: dict[str, np.ndarray], shards: int) -> None:
    tensors = to_safetensors_dict(dict(sorted(tensors.items())))
    if shards == 1:
        save_torch(tensors, str(folder / "model.safetensors"), metadata={"format": "mlx"})
        return
    # Split by key order into equal counts: a module's weight/scales/biases may straddle two files,
    # as happens in real shards.
    keys = list(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s * per:(s + 1) * per]}
        save_torch(part, str(folder / fname), metadata={"format": "mlx"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# --------------------------------------------------------------------------------------------


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    worst: dict[str, float] = {}

    def report(label: str, diff: float, must_exceed: float | None = None) -> None:
        print(f"  {label}: max|diff| = {diff:.3e}")
        if must_exceed is None:
            assert diff <= TOL, f"{label}: {diff} > {TOL}"
            worst[label] = diff
        else:
            assert diff > must_exceed, f"{label}: fixture not sensitive enough ({diff} <= {must_exceed})"

    print("qwen3-tiny")
    gen_qwen3_tiny(report)
    print("gemma-tiny")
    gen_gemma_tiny(report)
    print("qwen3-tiny-q4")
    gen_qwen3_quantized(report, "qwen3-tiny-q4", bits=4, group=32, shards=2, seed=4321)
    print("qwen3-tiny-q8")
    # Group 64 must divide every input dim: 4 heads x 32 = 128 (o_proj) and intermediate 128.
    gen_qwen3_quantized(report, "qwen3-tiny-q8", bits=8, group=64, shards=1, seed=8765,
                        head_dim=32, intermediate_size=128)

    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"total fixture size: {size} bytes")
    assert size < MAX_FIXTURE_BYTES, size
    print(f"largest self-check diff: {max(worst.values()):.3e} (tolerance {TOL})")


if __name__ == "__main__":
    main()
