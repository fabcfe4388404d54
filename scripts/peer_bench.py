#!/usr/bin/env python3
"""The PyTorch peer of `mlx-embed bench`: sentence-transformers (transformers underneath) on the
same model folder (a real checkpoint, or one written by `mlx-embed synth`), the same kinds of
texts, on the same machine.

Measures, in one process:
  - single short query (4-12 words, batch 1, one caller): latency P50/P95/P99 over --queries calls;
  - documents (100-195 words, about 128-256 tokens) at batch --batch: tokens/s and texts/s over
    --seconds, tokens counted as the model sees them (attention mask), prompts included.
It also loads the model (load time) and reports peak memory (RSS; CUDA allocator peak on a GPU).

  python3 scripts/peer_bench.py --model-dir DIR [--device cpu|cuda] [--dtype f32|bf16]
      [--batch 32] [--seconds 20] [--queries 200] [--json FILE]

Environment: torch, transformers, sentence-transformers (scripts/requirements-peer.txt).
"""
import argparse
import json
import random
import resource
import sys
import time

# The words of `mlx-embed bench`'s texts (src/bench.rs, WORDS); lengths as there.
WORDS = (
    "vector search index query document embedding model latency memory batch token server "
    "cluster shard replica storage engine result ranking filter distance cosine graph neighbor "
    "cache request stream the a of and to in for with on fast exact large small database "
    "throughput network recall precision update insert delete"
).split()


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def percentile(values, p):
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # nearest rank
    return ordered[int(rank) - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    model = SentenceTransformer(args.model_dir, device=args.device, model_kwargs={"torch_dtype": dtype})
    model.eval()
    sync()
    load_s = time.perf_counter() - started

    rng = random.Random(args.seed)
    docs = [text(rng, 100, 195) for _ in range(max(4 * args.batch, 256))]
    queries = [text(rng, 4, 12) for _ in range(args.queries)]
    doc_prompt = "document" if "document" in model.prompts else None

    def tokens(texts, prompt_name):
        prompt = model.prompts.get(prompt_name, "") if prompt_name else ""
        features = model.tokenize([prompt + t for t in texts])
        return int(features["attention_mask"].sum())

    with torch.inference_mode():
        # Warm-up: kernels, allocator, autotuning.
        for _ in range(3):
            model.encode(docs[: args.batch], batch_size=args.batch, prompt_name=doc_prompt, convert_to_numpy=False)
            model.encode(queries[:1], batch_size=1, prompt_name="query", convert_to_numpy=False)
        sync()

        latencies = []
        for q in queries:
            t0 = time.perf_counter()
            model.encode([q], batch_size=1, prompt_name="query", convert_to_numpy=True)
            sync()
            latencies.append((time.perf_counter() - t0) * 1000)

        done_texts = done_tokens = 0
        i = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            batch = [docs[(i + k) % len(docs)] for k in range(args.batch)]
            i += args.batch
            model.encode(batch, batch_size=args.batch, prompt_name=doc_prompt, convert_to_numpy=True)
            sync()
            done_texts += len(batch)
            done_tokens += tokens(batch, doc_prompt)
        elapsed = time.perf_counter() - t0

    report = {
        "peer": "sentence-transformers",
        "versions": {
            "torch": torch.__version__,
            "sentence_transformers": __import__("sentence_transformers").__version__,
            "transformers": __import__("transformers").__version__,
        },
        "model_dir": args.model_dir,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_seconds": round(load_s, 3),
        "single_query_ms": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "p99": round(percentile(latencies, 99), 3),
            "calls": len(latencies),
        },
        "documents": {
            "batch": args.batch,
            "seconds": round(elapsed, 3),
            "texts_per_second": round(done_texts / elapsed, 1),
            "tokens_per_second": round(done_tokens / elapsed, 1),
            "tokens_per_text": round(done_tokens / max(done_texts, 1), 1),
        },
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if cuda:
        report["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    line = json.dumps(report)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
