//! The Prometheus endpoint of a real server (127.0.0.1, port 0): every series exists from the
//! start, requests and items are counted exactly by model, kind and status code, stage times come
//! back as response metadata, calls refused while their message is read and responses over the
//! message limit are counted under the codes they get, `/metrics` answers `HEAD` and refuses
//! other methods, and everything in `deploy/` (recording rules, alerts, the Grafana dashboard)
//! names metrics the service exports and passes `promtool`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::raw::{self, RawCall};
use common::server::*;
use prost::Message;
use tonic::Code;

fn scrape() -> String {
    let url = format!("http://{}/metrics", server().metrics_addr);
    ureq::get(&url).call().unwrap().body_mut().read_to_string().unwrap()
}

/// The value of the series `name{labels}` (labels in the exporter's order), if exported.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Series names in an exposition text (without labels).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string()).collect()
}

#[test]
fn every_series_exists_before_the_first_request() {
    // `absent` never loads and no test sends it anything: what it shows is the start-up state.
    let text = scrape();
    for series in [
        r#"mlx_embed_request_duration_seconds_bucket{rpc="Embed",model="absent",le="0.025"}"#,
        r#"mlx_embed_request_duration_seconds_count{rpc="Embed",model="absent"}"#,
        r#"mlx_embed_requests_total{rpc="Embed",model="absent",code="OK"}"#,
        r#"mlx_embed_stage_duration_seconds_bucket{model="absent",stage="queue",le="0.025"}"#,
        r#"mlx_embed_items_total{model="absent",kind="vector"}"#,
        r#"mlx_embed_batch_size_count{model="absent"}"#,
        r#"mlx_embed_new_batch_shapes_total{model="absent"}"#,
        r#"mlx_embed_queue_depth{model="absent"}"#,
        r#"mlx_embed_model_ready{model="absent"}"#,
    ] {
        assert_eq!(value(&text, series), Some(0.0), "{series} missing or not 0 in:\n{text}");
    }
    assert_eq!(value(&text, "mlx_embed_latency_target_seconds"), Some(0.025));
    assert!(value(&text, r#"mlx_embed_model_pulls_total{source="hf://org/not-cached",result="ok"}"#).is_some());
    // The health watchers publish readiness as the server starts.
    let t0 = std::time::Instant::now();
    while value(&scrape(), r#"mlx_embed_model_ready{model="qwen"}"#) != Some(1.0) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "qwen never reported ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(value(&text, r#"mlx_embed_queue_capacity{model="qwen"}"#), Some(8192.0));
    assert!(text.contains("mlx_embed_build_info{version=\""), "{text}");
    if cfg!(target_os = "linux") {
        assert!(value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6));
    }
    // The 25 ms boundary sits among fine buckets.
    for le in ["0.0225", "0.025", "0.0275"] {
        assert!(text.contains(&format!(r#"model="absent",le="{le}"}}"#)), "no bucket at {le}");
    }
}

#[tokio::test]
async fn requests_and_items_are_counted_exactly_and_timings_come_back_as_metadata() {
    let mut c = client().await;
    let before = scrape();
    let ok = |t: &str| value(t, r#"mlx_embed_requests_total{rpc="Embed",model="short",code="OK"}"#).unwrap_or(0.0);
    let bad = |t: &str| value(t, r#"mlx_embed_requests_total{rpc="Embed",model="short",code="INVALID_ARGUMENT"}"#).unwrap_or(0.0);
    let texts = |t: &str| value(t, r#"mlx_embed_items_total{model="short",kind="text"}"#).unwrap();
    let vectors = |t: &str| value(t, r#"mlx_embed_items_total{model="short",kind="vector"}"#).unwrap();
    let count = |t: &str| value(t, r#"mlx_embed_request_duration_seconds_count{rpc="Embed",model="short"}"#).unwrap();
    for i in 0..5 {
        let mut req = tonic::Request::new(request("short", vec![text(&format!("text {i}")), text("two"), vector(vec![1.0; 64])]));
        req.metadata_mut().insert("x-request-id", format!("req-{i}").parse().unwrap());
        let resp = c.embed(req).await.unwrap();
        let md = resp.metadata();
        assert_eq!(md.get("x-request-id").unwrap(), format!("req-{i}").as_str());
        let ms = |key: &str| -> f64 { md.get(key).unwrap_or_else(|| panic!("no {key}")).to_str().unwrap().parse().unwrap() };
        let stages = ["x-tokenization-time", "x-queue-time", "x-launch-time", "x-inference-time", "x-serialization-time"].map(ms);
        assert!(stages[3] > 0.0, "no inference time: {stages:?}");
        // Building a batch's graph takes time of its own.
        assert!(stages[2] > 0.0, "no launch time: {stages:?}");
        assert!(stages.iter().all(|s| *s >= 0.0));
        // The stages happen one after the other inside the request (3 decimals each).
        assert!(stages.iter().sum::<f64>() <= ms("x-total-time") + 0.004, "{stages:?} > {}", ms("x-total-time"));
    }
    let mut wrong = request("short", vec![text("x")]);
    wrong.dimensions = Some(7);
    let status = c.embed(wrong).await.unwrap_err();
    assert!(status.metadata().get("x-request-id").is_some());
    let _ = c.embed(request("no-such-model", vec![text("x")])).await.unwrap_err();

    let after = scrape();
    assert_eq!(ok(&after) - ok(&before), 5.0);
    assert_eq!(bad(&after) - bad(&before), 1.0);
    // The refused request counts, but not in the latency histogram (refusals are instant).
    assert_eq!(count(&after) - count(&before), 5.0);
    assert_eq!(texts(&after) - texts(&before), 10.0);
    assert_eq!(vectors(&after) - vectors(&before), 5.0);
    // Unknown model names share one label value (clients cannot grow the label set).
    assert!(value(&after, r#"mlx_embed_requests_total{rpc="Embed",model="unknown",code="NOT_FOUND"}"#).is_some_and(|v| v >= 1.0));
    assert!(!after.contains("no-such-model"));
    // The engine's side: tokens, batches, stages.
    assert!(value(&after, r#"mlx_embed_tokens_total{model="short"}"#).unwrap() > value(&before, r#"mlx_embed_tokens_total{model="short"}"#).unwrap());
    assert!(value(&after, r#"mlx_embed_batch_size_count{model="short"}"#).unwrap() >= 1.0);
    // Batches of two texts of a few tokens: a shape the load's warm-up did not run.
    assert!(value(&after, r#"mlx_embed_new_batch_shapes_total{model="short"}"#).unwrap() >= 1.0, "{after}");
    for stage in ["tokenize", "queue", "launch", "inference", "serialize"] {
        let series = format!(r#"mlx_embed_stage_duration_seconds_count{{model="short",stage="{stage}"}}"#);
        assert!(value(&after, &series).unwrap() - value(&before, &series).unwrap() >= 5.0, "{series}");
    }
    let peak = after.lines().find(|l| l.starts_with("mlx_embed_mlx_memory_bytes{") && l.contains(r#"kind="peak""#)).unwrap();
    assert!(peak.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > 0.0, "{peak}");
}

#[tokio::test]
async fn a_request_the_client_abandons_is_counted_as_cancelled() {
    let mut c = client().await;
    let cancelled = |t: &str| value(t, r#"mlx_embed_requests_total{rpc="Embed",model="gemma",code="CANCELLED"}"#).unwrap_or(0.0);
    let before = cancelled(&scrape());
    let long = "a long text that keeps the model busy for a while ".repeat(20);
    let req = request("gemma", (0..16).map(|_| text(&long)).collect());
    // Dropping the call resets the HTTP/2 stream: the server's handler is dropped mid-way.
    let gave_up = tokio::time::timeout(std::time::Duration::from_millis(5), c.embed(req)).await;
    assert!(gave_up.is_err(), "the request finished within 5 ms: nothing was abandoned");
    let t0 = std::time::Instant::now();
    while cancelled(&scrape()) < before + 1.0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "the abandoned request was never counted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A response over `max_message_bytes` (reachable in one call: the request's `request_id` comes
/// back in it) is refused with RESOURCE_EXHAUSTED, saying it is too large and the limit, and is
/// counted under that code, not as answered.
#[tokio::test]
async fn a_response_over_the_message_limit_is_resource_exhausted_and_counted_so() {
    let mut c = client().await;
    let exhausted = |t: &str| value(t, r#"mlx_embed_requests_total{rpc="Embed",model="gemma",code="RESOURCE_EXHAUSTED"}"#).unwrap_or(0.0);
    let before = exhausted(&scrape());
    // The id fits a 65,536-byte request; with 16 vectors of 48 floats the response does not.
    let mut req = request("gemma", (0..16).map(|i| text(&format!("text {i}"))).collect());
    req.request_id = "r".repeat(63_000);
    let status = c.embed(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("response is too large") && status.message().contains("65536"), "{}", status.message());
    assert_eq!(exhausted(&scrape()) - before, 1.0);
}

/// Calls refused while their message is read (bytes that are not an EmbedRequest, a message over
/// `max_message_bytes`) get INVALID_ARGUMENT and RESOURCE_EXHAUSTED, in a unary call and on a
/// stream alike, and are counted under those codes, as model `unknown` (the model's name was never
/// read).
#[tokio::test]
async fn calls_refused_while_their_message_is_read_are_counted() {
    let addr = server().addr.to_string();
    // Field 1 (`model`, a string) holding bytes that are not UTF-8.
    let malformed = vec![0x0a, 0x02, 0xff, 0xfe];
    let too_large = request("qwen", vec![text(&"x".repeat(70_000))]).encode_to_vec();
    for rpc in ["Embed", "EmbedStream"] {
        let count = |t: &str, code: &str| value(t, &format!(r#"mlx_embed_requests_total{{rpc="{rpc}",model="unknown",code="{code}"}}"#)).unwrap_or(0.0);
        let before = scrape();
        for (message, code) in [(malformed.clone(), Code::InvalidArgument), (too_large.clone(), Code::ResourceExhausted)] {
            let path = format!("/embedding.v1.EmbeddingService/{rpc}");
            let answer = raw::call(&addr, RawCall { path: &path, timeout: None, message, after: Duration::ZERO }).await;
            assert_eq!(answer.code, code, "{rpc}: {answer:?}");
        }
        let after = scrape();
        assert_eq!(count(&after, "INVALID_ARGUMENT") - count(&before, "INVALID_ARGUMENT"), 1.0, "{rpc}");
        assert_eq!(count(&after, "RESOURCE_EXHAUSTED") - count(&before, "RESOURCE_EXHAUSTED"), 1.0, "{rpc}");
    }
}

/// `method /metrics` over HTTP/1.1, as the server wrote the answer.
fn http(method: &str) -> String {
    let mut tcp = std::net::TcpStream::connect(server().metrics_addr).unwrap();
    write!(tcp, "{method} /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    answer
}

/// `HEAD /metrics` gets 200 with the headers a `GET` gets and no body; other methods get 405 with
/// `Allow: GET, HEAD`.
#[test]
fn head_gets_the_headers_of_metrics_and_other_methods_are_not_allowed() {
    let head = http("HEAD");
    let (headers, body) = head.split_once("\r\n\r\n").unwrap();
    let headers = headers.to_ascii_lowercase();
    assert!(headers.starts_with("http/1.1 200"), "{head}");
    assert!(headers.contains("content-type: text/plain; version=0.0.4"), "{head}");
    let length = headers.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|n| n.parse::<usize>().unwrap());
    assert!(length.is_some_and(|n| n > 1000), "no length of what GET would send: {head}");
    assert!(body.is_empty(), "a body after HEAD: {body}");
    for method in ["POST", "PUT", "DELETE"] {
        let answer = http(method).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 405"), "{method}: {answer}");
        assert!(answer.contains("\r\nallow: get, head\r\n"), "{method}: {answer}");
    }
}

fn deploy(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// Metric names (and recording rule names) in a PromQL expression.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' {
            // Skip label values.
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':') {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            if word.starts_with("mlx_embed") || word.starts_with("process_") {
                out.push(word);
            }
            continue;
        }
        i += 1;
    }
    out
}

fn recording_rules() -> BTreeSet<String> {
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap()).unwrap();
    rules["groups"].as_sequence().unwrap().iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .filter_map(|r| r["record"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn the_dashboard_and_the_rules_only_name_exported_metrics() {
    // After one request every histogram has samples (its _bucket/_sum/_count exist either way).
    let mut c = client().await;
    c.embed(request("qwen", vec![text("warm")])).await.unwrap();
    let exported = series_names(&scrape());
    let records = recording_rules();
    let known = |name: &str| exported.contains(name) || records.contains(name);

    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(deploy("grafana/mlx-embed.json")).unwrap()).unwrap();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string() && dashboard["schemaVersion"].is_number());
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 6);
    let mut checked = 0;
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names = names_in(expr);
            assert!(!names.is_empty(), "panel `{}`: no metric in `{expr}`", p["title"]);
            for n in names {
                assert!(known(&n), "panel `{}` queries `{n}`, which the service does not export", p["title"]);
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked}");
    let latency = panels.iter().find(|p| p["title"].as_str().unwrap().contains("latency")).unwrap().to_string();
    assert!(latency.contains("p95") && latency.contains("mlx_embed_latency_target_seconds"), "the latency panel lacks the P95 or the 25 ms line");

    let rules = std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&rules).unwrap();
    for r in rules["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap().iter()) {
        let expr = r["expr"].as_str().unwrap();
        for n in names_in(expr) {
            assert!(known(&n), "rule `{:?}` uses `{n}`, which the service does not export", r["record"].as_str().or(r["alert"].as_str()));
        }
    }
}

#[test]
fn promtool_accepts_the_config_and_rules_and_the_rule_tests_pass() {
    for args in [
        vec!["check", "config", "prometheus/prometheus.yml"],
        vec!["check", "rules", "prometheus/rules.yml"],
        vec!["test", "rules", "prometheus/rules_test.yml"],
    ] {
        let out = Command::new("promtool").args(&args).current_dir(deploy("")).output()
            .expect("promtool (Debian package prometheus) is installed by scripts/setup.sh");
        assert!(out.status.success(), "promtool {args:?}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn metric_names_carry_their_units() {
    let text = scrape();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ") && l.ends_with(" counter")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(name.ends_with("_total"), "counter {name}");
    }
    for name in series_names(&text) {
        let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        if base.contains("duration") || base.contains("target") {
            assert!(base.ends_with("_seconds"), "{name}");
        }
        if base.contains("memory") {
            assert!(base.ends_with("_bytes"), "{name}");
        }
    }
}
