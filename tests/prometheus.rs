//! A real Prometheus (Debian's package, installed by `scripts/setup.sh`) scrapes a real server
//! every second, with the recording rules of `deploy/prometheus/rules.yml` loaded. After a known
//! load, its request counts equal what the client sent, and its P95 per model (from the raw
//! buckets and from the recording rule) agrees with the P95 the client measured, within the
//! histogram's bucket resolution.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::*;
use mlx_embed::metrics::LATENCY_BUCKETS;

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\n\
         scrape_configs:\n  - job_name: mlx-embed\n    static_configs: [{{targets: ['{target}']}}]\n",
        rules.display()
    )).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null()).stderr(Stdio::null())
        .spawn().expect("prometheus (Debian package) is installed by scripts/setup.sh");
    let p = Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
    let t0 = Instant::now();
    while ureq::get(&format!("{}/-/ready", p.url)).call().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "Prometheus did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

/// The single value of an instant query, if it has one.
fn query(p: &Prometheus, promql: &str) -> Option<f64> {
    let mut resp = ureq::get(&format!("{}/api/v1/query", p.url)).query("query", promql).call().unwrap();
    let body: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let result = body["data"]["result"].as_array()?;
    let v = result.first()?["value"][1].as_str()?.parse().ok()?;
    Some(v)
}

fn wait_for(p: &Prometheus, promql: &str, want: impl Fn(f64) -> bool) -> f64 {
    let t0 = Instant::now();
    loop {
        if let Some(v) = query(p, promql).filter(|v| want(*v)) {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "`{promql}` never reached the expected value (last: {:?})", query(p, promql));
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The histogram bucket (lower, upper] that holds `x`. PromQL's interpolation can land a hair
/// above a boundary (0.020000000000000035 for 0.02): within 1e-9 of it counts as on it.
fn bucket_of(x: f64) -> (f64, f64) {
    let i = LATENCY_BUCKETS.iter().position(|b| x <= *b + 1e-9).unwrap_or(LATENCY_BUCKETS.len() - 1);
    (if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] }, LATENCY_BUCKETS[i])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_p95_the_client_measured_and_every_request() {
    let prom = start_prometheus(server().metrics_addr);
    // A first scrape before the load, so rates over the load have two samples to work with.
    wait_for(&prom, r#"up{job="mlx-embed"}"#, |v| v == 1.0);
    const N: usize = 120;
    let mut measured: Vec<(&str, Vec<f64>)> = Vec::new();
    for model in ["qwen", "gemma"] {
        // One client, one request at a time: with concurrent clients on a small machine, time a
        // request spends waiting for a thread before the server's handler starts is real to the
        // client but invisible to the server, and the comparison would measure the machine.
        let mut c = client().await;
        let mut lat = Vec::new();
        for i in 0..N {
            let t = "word ".repeat(1 + (i * 7) % 60); // varied lengths spread the latencies
            let t0 = Instant::now();
            c.embed(request(model, vec![text(&t)])).await.unwrap();
            lat.push(t0.elapsed().as_secs_f64());
        }
        measured.push((model, lat));
    }

    for (model, lat) in measured {
        let count = format!(r#"sum(mlx_embed_requests_total{{rpc="Embed",model="{model}",code="OK"}})"#);
        let seen = wait_for(&prom, &count, |v| v >= N as f64);
        assert_eq!(seen, N as f64, "{model}: Prometheus counted {seen} requests, the client sent {N}");

        let client_p95 = percentile(lat.clone(), 0.95);
        let raw = format!(r#"histogram_quantile(0.95, sum by (le) (mlx_embed_request_duration_seconds_bucket{{rpc="Embed",model="{model}"}}))"#);
        let server_p95 = query(&prom, &raw).unwrap();
        // The server measures a little less than the client (no network, no client work): the
        // client's P95 lies in the bucket of the server's, or in the next one up.
        let (low, high) = bucket_of(server_p95);
        let next_high = LATENCY_BUCKETS.iter().copied().find(|b| *b > high).unwrap_or(high);
        assert!(client_p95 >= low && client_p95 <= next_high,
            "{model}: client P95 {client_p95:.4}s, Prometheus P95 {server_p95:.4}s in bucket ({low}, {high}]");

        // Means: the server's (sum/count) is below the client's, which adds the network and the
        // client's own work, but not by much.
        let mean = |what: &str| query(&prom, &format!(r#"sum(mlx_embed_request_duration_seconds_{what}{{rpc="Embed",model="{model}"}})"#)).unwrap();
        let server_mean = mean("sum") / mean("count");
        let client_mean = lat.iter().sum::<f64>() / lat.len() as f64;
        assert!(server_mean <= client_mean && server_mean >= 0.6 * client_mean - 0.002,
            "{model}: server mean {server_mean:.4}s, client mean {client_mean:.4}s");

        // The recording rule operators alert on gives the same bucket, once evaluated after the
        // scrape that saw the last request (1 s scrapes, 1 s evaluations).
        std::thread::sleep(Duration::from_millis(2500));
        let rule = format!(r#"mlx_embed:request_duration_seconds:p95_5m{{model="{model}"}}"#);
        let ruled = wait_for(&prom, &rule, |v| v.is_finite() && v > 0.0);
        assert_eq!(bucket_of(ruled), (low, high), "{model}: rule P95 {ruled}, raw P95 {server_p95}");
        eprintln!("{model}: {N} requests; client P95 {:.2} ms, Prometheus P95 {:.2} ms (raw), {:.2} ms (rule)",
            client_p95 * 1e3, server_p95 * 1e3, ruled * 1e3);
    }
}
