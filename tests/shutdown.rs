//! `mlx-embed serve` as a process: it prints its address, serves, and on SIGTERM finishes the
//! requests in flight, then exits cleanly.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{request, text};
use common::*;
use mlx_embed::grpc::pb::embedding_service_client::EmbeddingServiceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_requests_in_flight_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let model = fixtures_dir().join("gemma-tiny");
    std::fs::write(&config, format!("models:\n  - {{name: g, source: {}, device: cpu}}\n", model.display())).unwrap();
    let (mut child, addr, _log) = spawn_serve(&config, |_| {});

    let url = format!("http://{addr}");
    let mut c = EmbeddingServiceClient::connect(url.clone()).await.unwrap();
    // Wait for the model (NOT_SERVING until loaded).
    let t0 = Instant::now();
    while c.embed(request("g", vec![text("warm")])).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "model never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let long = "a fairly long text that keeps the model busy for a while ".repeat(8);
    let tasks: Vec<_> = (0..8).map(|_| {
        let (mut c, long) = (c.clone(), long.clone());
        tokio::spawn(async move {
            let r = c.embed(request("g", (0..16).map(|_| text(&long)).collect())).await;
            (r, Instant::now())
        })
    }).collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let killed = Instant::now();
    assert!(status.success());
    let mut after_kill = 0;
    for t in tasks {
        let (r, done) = t.await.unwrap();
        after_kill += usize::from(done > killed);
        assert!(r.is_ok(), "a request in flight at SIGTERM failed: {r:?}");
        assert_eq!(r.unwrap().into_inner().embeddings.len(), 16);
    }
    assert!(after_kill > 0, "every request finished before SIGTERM: the test proved nothing");
    let t1 = Instant::now();
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(20), "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
