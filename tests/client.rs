//! The Rust client against real servers (`mlx-embed serve` processes on 127.0.0.1): calls spread
//! over the endpoints; an instance killed mid-ingest costs retries, not items (every item comes
//! back once, with its exact vector); RESOURCE_EXHAUSTED is retried until admitted; the call's
//! deadline bounds waiting, retrying and unreachable endpoints; a name's addresses are followed as
//! they change; the example runs end to end.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::{join_all, BoxFuture};
use futures_util::stream::{self, StreamExt};
use mlx_embed::client::{Client, ClientError, EmbedOptions, Resolve, RetryPolicy};
use tonic::Code;

struct Server {
    child: Child,
    addr: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Server {
    fn start(extra: &str) -> Server {
        let (dir, path) = q_config(extra);
        let (child, addr, log) = spawn_serve(&path, |_| {});
        Server { child, addr, metrics: metrics_addr(&log), _dir: dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn socket(&self) -> SocketAddr {
        self.addr.parse().unwrap()
    }

    /// Embed calls this server answered OK.
    fn embeds_ok(&self) -> f64 {
        scrape_value(&self.metrics, r#"mlx_embed_requests_total{rpc="Embed",model="q",code="OK"}"#).unwrap_or(0.0)
    }
}

/// Waits until each server reports its model ready, through a client of that server alone.
async fn ready(servers: &[&Server]) {
    for s in servers {
        let client = Client::builder().endpoint(s.url()).timeout(Duration::from_secs(2)).build().await.unwrap();
        let t0 = Instant::now();
        while !client.model("q").await.is_ok_and(|m| m.state == mlx_embed::grpc::pb::ModelState::Ready as i32) {
            assert!(t0.elapsed() < Duration::from_secs(60), "the model never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The fixture's `query` case: each text with its reference vector.
fn query_cases() -> Vec<(String, Vec<f32>)> {
    let case = reference(&fixtures_dir().join("qwen3-tiny")).cases.into_iter().find(|c| c.prompt_name.as_deref() == Some("query")).unwrap();
    case.texts.into_iter().zip(case.embeddings).collect()
}

/// A document of the ingest test: its id travels with its text.
#[derive(Debug)]
struct Doc {
    id: usize,
    text: String,
}

impl AsRef<str> for Doc {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

const WORDS: [&str; 12] = ["vector", "store", "query", "embedding", "index", "shard", "replica", "token", "batch", "model", "graph", "cosine"];

fn doc_text(id: usize) -> String {
    (0..1 + id % 7).map(|k| WORDS[(id * 5 + k * 3) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_spread_over_three_endpoints_and_vectors_match_the_reference() {
    let servers: Vec<Server> = (0..3).map(|_| Server::start("")).collect();
    ready(&servers.iter().collect::<Vec<_>>()).await;
    let before: Vec<f64> = servers.iter().map(Server::embeds_ok).collect();

    let client = Client::builder().endpoints(servers.iter().map(Server::url)).batch_items(3).concurrency(6).build().await.unwrap();
    for (text, want) in query_cases() {
        let got = client.embed_query("q", &text).await.unwrap();
        assert!(max_abs_diff(&got, &want) <= 1e-5, "{text:?}");
    }
    let texts: Vec<String> = (0..90).map(doc_text).collect();
    let vectors = client.embed_documents("q", &texts).await.unwrap();
    assert_eq!(vectors.len(), 90);

    let served: Vec<f64> = servers.iter().zip(&before).map(|(s, b)| s.embeds_ok() - b).collect();
    let queries = query_cases().len() as f64;
    assert_eq!(served.iter().sum::<f64>(), queries + 30.0, "{served:?}");
    assert!(served.iter().all(|&n| n >= 3.0), "calls did not spread: {served:?}");
    let stats = client.endpoints();
    assert_eq!(stats.len(), 3);
    assert!(stats.iter().all(|e| e.calls > 0 && e.failures == 0 && e.in_flight == 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_killed_mid_ingest_costs_retries_and_every_item_comes_back_once_and_exact() {
    // Each request waits 40 ms in the batcher, so several are in flight on every instance.
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start("batching: {max_wait: 40ms}")).collect();
    ready(&servers.iter().collect::<Vec<_>>()).await;
    let victim = servers[1].socket();

    // The vectors the ingest must reproduce, from one instance, one text per call.
    let reference_client = Client::connect(servers[0].url()).await.unwrap();
    let distinct: Vec<String> = (0..WORDS.len() * 7).map(doc_text).collect::<BTreeSet<_>>().into_iter().collect();
    let mut reference = std::collections::HashMap::new();
    for text in &distinct {
        let v = reference_client.embed_texts("q", &[text], &EmbedOptions::document()).await.unwrap();
        reference.insert(text.clone(), v[0].vector.clone());
    }

    let client = Client::builder().endpoints(servers.iter().map(Server::url)).batch_items(4).concurrency(6).build().await.unwrap();
    let n = 400;
    let docs = stream::iter((0..n).map(|id| Doc { id, text: doc_text(id) }));
    let mut batches = Box::pin(client.ingest("q", &EmbedOptions::document(), docs));
    let mut seen = vec![0u32; n];
    let mut received = 0;
    let mut killed_after = None;
    while let Some(batch) = batches.next().await {
        let batch = batch.unwrap_or_else(|e| panic!("items lost: {e}"));
        for (doc, embedded) in batch {
            seen[doc.id] += 1;
            let d = max_abs_diff(&embedded.vector, &reference[&doc.text]);
            assert!(d <= 1e-5, "doc {}: {d:e} from the reference", doc.id);
            received += 1;
        }
        if killed_after.is_none() && received >= 40 {
            let stats = client.endpoints();
            let on_victim = stats.iter().find(|e| e.address == victim).unwrap();
            assert!(on_victim.calls > 0, "{stats:?}");
            servers[1].child.kill().unwrap();
            killed_after = Some(received);
        }
    }
    assert!(killed_after.is_some_and(|k| k < n / 2), "the kill came too late: {killed_after:?}");
    assert!(seen.iter().all(|&c| c == 1), "items not seen exactly once: {:?}", seen.iter().enumerate().filter(|(_, &c)| c != 1).collect::<Vec<_>>());
    let stats = client.endpoints();
    let on_victim = stats.iter().find(|e| e.address == victim).unwrap();
    assert!(on_victim.failures >= 1, "the killed instance's failures were not recorded: {stats:?}");
    servers.truncate(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resource_exhausted_is_retried_with_backoff_until_admitted() {
    let server = Server::start("limits: {max_concurrent_requests: 1}\nbatching: {max_wait: 20ms}");
    ready(&[&server]).await;
    let refused = || scrape_value(&server.metrics, r#"mlx_embed_requests_refused_total{reason="overloaded"}"#).unwrap();

    // Without retries some of 8 concurrent calls are refused: the load does overload the server.
    let no_retry = Client::builder().endpoint(server.url()).retry(RetryPolicy::never()).build().await.unwrap();
    let results = join_all((0..8).map(|i| {
        let c = no_retry.clone();
        async move { c.embed_query("q", &format!("text {i}")).await }
    }))
    .await;
    let refusals = results.iter().filter(|r| matches!(r, Err(e) if e.code() == Some(Code::ResourceExhausted))).count();
    assert!(refusals > 0, "no refusal to retry: {results:?}");
    assert_eq!(refusals + results.iter().filter(|r| r.is_ok()).count(), 8);

    // With retries (RetryInfo says 100 ms) every call gets through, and its vector is exact.
    let refused_before = refused();
    let retry = RetryPolicy { max_attempts: 50, ..RetryPolicy::default() };
    let client = Client::builder().endpoint(server.url()).retry(retry).build().await.unwrap();
    let cases = query_cases();
    let results = join_all(cases.iter().cycle().take(8).map(|(text, want)| {
        let c = client.clone();
        async move { (c.embed_query("q", text).await, want) }
    }))
    .await;
    for (got, want) in results {
        let got = got.expect("retried until admitted");
        assert!(max_abs_diff(&got, want) <= 1e-5);
    }
    assert!(refused() > refused_before, "the second round was never refused, so nothing was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deadline_bounds_a_slow_server_retries_and_an_unreachable_endpoint() {
    // A slow server: a lone text waits 3 s in the batcher.
    let slow = Server::start("batching: {max_wait: 3s}");
    ready(&[&slow]).await;
    let client = Client::builder().endpoint(slow.url()).timeout(Duration::from_millis(300)).build().await.unwrap();
    let t0 = Instant::now();
    let err = client.embed_query("q", "slow").await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(took >= Duration::from_millis(280) && took < Duration::from_millis(1300), "{took:?}");
    // A slow answer is not the endpoint's failure: it stays in service.
    let stats = client.endpoints();
    assert!(stats[0].failures == 0 && stats[0].in_service, "{stats:?}");

    // A server that refuses everything (its one place is held by a slow call): retries stop at
    // the deadline, which names the last answer.
    let busy = Server::start("limits: {max_concurrent_requests: 1}\nbatching: {max_wait: 3s}");
    ready(&[&busy]).await;
    let holder = Client::builder().endpoint(busy.url()).retry(RetryPolicy::never()).build().await.unwrap();
    let hold = tokio::spawn(async move { holder.embed_query("q", "holding the place").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = Client::builder().endpoint(busy.url()).timeout(Duration::from_millis(700)).build().await.unwrap();
    let t0 = Instant::now();
    let err = client.embed_query("q", "refused").await.unwrap_err();
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1700), "{took:?}");
    assert!(
        matches!(err.code(), Some(Code::DeadlineExceeded) | Some(Code::ResourceExhausted)),
        "{err}"
    );
    assert!(err.to_string().contains("ResourceExhausted") || err.code() == Some(Code::ResourceExhausted), "{err}");
    hold.abort();

    // Nothing listens: connection refused is retried (backoff) until the attempts run out.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let client = Client::builder().endpoint(format!("http://{closed}")).timeout(Duration::from_millis(800)).build().await.unwrap();
    let t0 = Instant::now();
    let err = client.embed_query("q", "nobody").await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(1800), "{:?}", t0.elapsed());
    assert!(matches!(err.code(), Some(Code::Unavailable) | Some(Code::DeadlineExceeded)), "{err}");
    assert!(client.endpoints()[0].failures >= 1);
}

/// Answers with whatever address list the test has put in, like a headless Service's DNS name
/// as pods come and go.
#[derive(Clone)]
struct Switchboard(Arc<Mutex<Vec<SocketAddr>>>);

impl Resolve for Switchboard {
    fn resolve(&self, host: &str, _port: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        assert_eq!(host, "embed.fleet.test");
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_stands_for_all_its_addresses_and_changes_are_followed() {
    let servers: Vec<Server> = (0..3).map(|_| Server::start("")).collect();
    ready(&servers.iter().collect::<Vec<_>>()).await;
    let board = Switchboard(Arc::new(Mutex::new(vec![servers[0].socket(), servers[1].socket()])));
    let client = Client::builder()
        .endpoint("http://embed.fleet.test:50051")
        .resolver(board.clone())
        .resolve_interval(Duration::from_millis(200))
        .batch_items(3)
        .build()
        .await
        .unwrap();
    let addresses = |c: &Client| c.endpoints().iter().map(|e| e.address).collect::<BTreeSet<_>>();
    assert_eq!(addresses(&client), BTreeSet::from([servers[0].socket(), servers[1].socket()]));
    let texts: Vec<String> = (0..24).map(doc_text).collect();
    let before: Vec<f64> = servers.iter().map(Server::embeds_ok).collect();
    client.embed_texts("q", &texts, &EmbedOptions::document()).await.unwrap();
    let mid: Vec<f64> = servers.iter().map(Server::embeds_ok).collect();
    assert!(mid[0] > before[0] && mid[1] > before[1] && mid[2] == before[2], "{before:?} -> {mid:?}");

    // The name now answers with instances 1 and 2: 0 gets no more calls, 2 takes its share.
    *board.0.lock().unwrap() = vec![servers[1].socket(), servers[2].socket()];
    let t0 = Instant::now();
    while addresses(&client) != BTreeSet::from([servers[1].socket(), servers[2].socket()]) {
        assert!(t0.elapsed() < Duration::from_secs(5), "the new addresses were never picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.embed_texts("q", &texts, &EmbedOptions::document()).await.unwrap();
    let after: Vec<f64> = servers.iter().map(Server::embeds_ok).collect();
    assert!(after[0] == mid[0] && after[1] > mid[1] && after[2] > mid[2], "{mid:?} -> {after:?}");

    // An empty answer (a DNS blip) keeps the addresses known.
    board.0.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(addresses(&client).len(), 2);
    client.embed_query("q", "still served").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_resolver_serves_localhost_and_caller_mistakes_are_not_retried() {
    let server = Server::start("");
    ready(&[&server]).await;
    let port = server.socket().port();
    let client = Client::builder().endpoint(format!("localhost:{port}")).build().await.unwrap();
    assert!(client.endpoints().iter().any(|e| e.address == server.socket()));
    for _ in 0..5 {
        client.embed_query("q", "via localhost").await.unwrap();
    }
    let before = server.embeds_ok();
    // (`localhost` may also name ::1, where nothing listens: only the server's address counts.)
    let calls = || client.endpoints().iter().filter(|e| e.address == server.socket()).map(|e| e.calls).sum::<u64>();
    let calls_before = calls();
    let err = client.embed_query("no-such-model", "x").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    let calls_after = calls();
    assert_eq!(calls_after, calls_before + 1, "a final error was retried");
    assert_eq!(server.embeds_ok(), before);
    match Client::builder().endpoint("ftp://x:1").build().await {
        Err(ClientError::Config(_)) => {}
        other => panic!("{:?}", other.err()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vector_store_example_ingests_and_queries_over_two_endpoints() {
    let servers: Vec<Server> = (0..2).map(|_| Server::start("")).collect();
    ready(&servers.iter().collect::<Vec<_>>()).await;
    // `cargo build --examples` (make test runs it first) puts it in target/<profile>/examples.
    let example = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("examples/vector_store");
    assert!(example.exists(), "{} is missing: run `cargo build --examples` first", example.display());
    let out = tokio::process::Command::new(&example)
        .arg("q")
        .args(servers.iter().map(Server::url))
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ingested 200 documents"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("query ")).count(), 2, "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.contains(" calls, 0 failures")).count(), 2, "{stdout}");
}
