#!/usr/bin/env python3
"""Per-request stage times of each measured window of a benchmark run, from the server's log.

The server logs each Embed call's stages and each batch's host times at debug level; with
`--log-format json` (or MLX_EMBED_LOG_FORMAT=json) and
RUST_LOG=info,mlx_embed::grpc::observe=debug,mlx_embed::engine=debug, this prints, for every
report of `mlx-embed bench --json` (one JSON object per line, as scripts/bench-vs-peer.sh writes
them), the P50 / P95 in ms of the calls the server finished inside that report's window:
`total`, `tokenize`, `queue`, `launch`, `inference`, and of its batches' `build` (the graph) and
`submit` (handing it to MLX).

    scripts/stage-times.py SERVER_LOG RESULTS_JSONL
"""
import json
import sys
from datetime import datetime, timezone

STAGES = ["total_ms", "tokenize_ms", "queue_ms", "launch_ms", "inference_ms"]
BATCH = ["build_ms", "submit_ms"]


def unix(stamp):
    # RFC 3339 in UTC ("...Z"), microseconds at most.
    return datetime.strptime(stamp.rstrip("Z")[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def events(log):
    """(time, model, kind, {field: ms}) of each call answered and each batch launched."""
    out = []
    for line in open(log, errors="replace"):
        if not line.startswith("{"):
            continue
        try:
            j = json.loads(line)
        except ValueError:
            continue
        f = j.get("fields", {})
        kind = {"ok": "call", "batch launched": "batch"}.get(f.get("message"))
        if kind is None or (kind == "call" and "launch_ms" not in f):
            continue
        ms = {k: float(v) for k, v in f.items() if k.endswith("_ms")}
        out.append((unix(j["timestamp"]), f.get("model"), kind, ms))
    return out


def quantile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main(log, results):
    seen = events(log)
    for line in open(results):
        r = json.loads(line)
        if "window_opened_unix_s" not in r:
            continue
        t0 = r["window_opened_unix_s"]
        t1 = t0 + r["seconds"]
        inside = [e for e in seen if t0 <= e[0] <= t1 and e[1] == r["model"]]
        calls = [e[3] for e in inside if e[2] == "call"]
        batches = [e[3] for e in inside if e[2] == "batch"]
        lat = r["latency_ms"]
        parts = [f"{r['model']} {r.get('run', r['workload'])}: client {lat['p50']:.2f} / {lat['p95']:.2f}"]
        for name, rows in ((STAGES, calls), (BATCH, batches)):
            for k in name:
                xs = [row[k] for row in rows if k in row]
                if xs:
                    parts.append(f"{k[:-3]} {quantile(xs, 0.5):.2f} / {quantile(xs, 0.95):.2f}")
        print(" · ".join(parts) + f" (P50 / P95 ms; {len(calls)} calls, {len(batches)} batches)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
