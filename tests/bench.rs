//! `mlx-embed bench`: against a server it starts (closed loop, the soak workload's every kind of
//! call) and against a running one (open loop at a fixed rate, with the server's stage times),
//! reporting JSON that adds up; `mlx-embed profile` in process.

mod common;

use std::process::Command;

use common::{fixtures_dir, metrics_addr, spawn_serve};

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, format!("models:\n  - {{name: q, source: {}, device: cpu}}\n", fixtures_dir().join("qwen3-tiny").display())).unwrap();
    path
}

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-embed")).arg("bench").args(args).args(["--json", "-"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn check_latency(r: &serde_json::Value) {
    let l = &r["latency_ms"];
    let [p50, p95, p99, max] = ["p50", "p95", "p99", "max"].map(|k| l[k].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max, "{l}");
}

#[test]
fn a_closed_loop_soak_against_a_started_server_reports_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let r = bench(&["--config", cfg.to_str().unwrap(), "--workload", "soak", "--batch", "3", "--concurrency", "3",
        "--warmup", "300ms", "--duration", "6s"]);
    assert_eq!(r["model"], "q");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 5, "{r}");
    assert!(r["items"].as_u64().unwrap() >= requests && r["tokens"].as_u64().unwrap() > requests, "{r}");
    for code in r["expected_errors"].as_object().unwrap().keys() {
        assert!(["InvalidArgument", "DeadlineExceeded", "Cancelled"].contains(&code.as_str()), "{r}");
    }
    check_latency(&r);
    assert!(r["server_rss_bytes"]["end"].as_f64().unwrap() > 1e6, "{r}");
}

#[test]
fn an_open_loop_against_a_running_server_keeps_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, log) = spawn_serve(&config(dir.path()), |_| {});
    let metrics = metrics_addr(&log);
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let before = unix_now();
    let r = bench(&["--addr", &addr, "--metrics-addr", &metrics, "--qps", "40", "--warmup", "500ms", "--duration", "2s"]);
    let after = unix_now();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    // 40 per second for 2 s: 80 due; none beyond, and most answered in the window.
    let requests = r["requests"].as_u64().unwrap();
    assert!((40..=81).contains(&requests), "{r}");
    assert_eq!(r["load"], serde_json::json!({"qps": 40.0}));
    // The window opened after the warm-up, and its measured length ended before the run returned
    // (an open loop may end a little early: once its last request is answered).
    let opened = r["window_opened_unix_s"].as_f64().unwrap();
    let seconds = r["seconds"].as_f64().unwrap();
    assert!(opened >= before + 0.5 && opened + seconds <= after, "{before} {after}: {r}");
    check_latency(&r);
    assert!(r["server_rss_bytes"]["start"].as_f64().unwrap() > 1e6, "{r}");
    // Where the server's time went, per request, from its stage histograms: inside the latency
    // the client saw.
    let stages = r["server_stages_ms"].as_object().unwrap_or_else(|| panic!("no server stages: {r}"));
    for stage in ["tokenize", "queue", "launch", "inference", "serialize"] {
        assert!(stages[stage].as_f64().is_some_and(|ms| ms >= 0.0), "{stage}: {r}");
    }
    assert!(stages["launch"].as_f64().unwrap() > 0.0 && stages["inference"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["server_new_shapes"].is_u64(), "{r}");
    let server: f64 = stages.values().map(|v| v.as_f64().unwrap()).sum();
    assert!(server <= r["latency_ms"]["max"].as_f64().unwrap(), "{r}");
}

#[test]
fn profile_times_each_shape_and_leaves_its_pauses_out() {
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
        .args(["profile", "--device", "cpu", "--shapes", "1x8,2x16", "--warmup", "1", "--iterations", "5", "--pause", "100ms", "--json", "-", "--model-dir"])
        .arg(fixtures_dir().join("qwen3-tiny"))
        .output()
        .unwrap();
    let wall = t.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shapes = r["shapes"].as_array().unwrap();
    assert_eq!(shapes.iter().map(|s| (s["batch"].as_u64().unwrap(), s["tokens"].as_u64().unwrap())).collect::<Vec<_>>(), [(1, 8), (2, 16)]);
    for s in shapes {
        assert_eq!(s["iterations"], 5, "{s}");
        assert!(s["ops"].as_u64().unwrap() > 0, "{s}");
        // A tiny model's forward takes a few milliseconds: the 100 ms pauses are not in it.
        let total = &s["total_ms"];
        assert!(total["p50"].as_f64().unwrap() > 0.0 && total["p50"].as_f64().unwrap() < 100.0, "{total}");
    }
    // …but they were taken: ten of them (the whole command takes well under a second without).
    assert!(wall >= std::time::Duration::from_secs(1), "{wall:?}");
}

#[test]
fn profile_with_overlap_hands_each_forward_over_before_collecting_the_one_before() {
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
        .args(["profile", "--device", "cpu", "--shapes", "2x16", "--warmup", "1", "--iterations", "8", "--overlap", "--json", "-", "--model-dir"])
        .arg(fixtures_dir().join("qwen3-tiny"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["overlap"], true);
    let s = &r["shapes"][0];
    assert_eq!(s["iterations"], 8, "{s}");
    // Each forward but the last is collected after the next one is built and handed over, so the
    // forwards' times add up to well past the wall time (about twice it here); one after another
    // they add up to less than it.
    let sum_of_totals = s["total_ms"]["mean"].as_f64().unwrap() * 8.0;
    let wall_ms = (2 * 16 * 8) as f64 / s["tokens_per_second"].as_f64().unwrap() * 1e3;
    assert!(sum_of_totals > 1.3 * wall_ms, "forwards {sum_of_totals:.2} ms in all, wall {wall_ms:.2} ms: {s}");
}

#[test]
fn profile_refuses_overlap_with_a_pause() {
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
        .args(["profile", "--device", "cpu", "--overlap", "--pause", "1ms", "--model-dir"])
        .arg(fixtures_dir().join("qwen3-tiny"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--overlap") && err.contains("--pause"), "{err}");
}
