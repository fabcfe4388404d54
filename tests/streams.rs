//! `EmbedStream` as bulk ingest uses it, against `mlx-embed serve` as a process: thousands of small
//! messages on one stream, each its own HTTP/2 DATA frame, are all answered in order, paced or not,
//! while other calls on the same connection go on; a stream that runs too far ahead of its answers
//! is ended with RESOURCE_EXHAUSTED (the connection lives on); an idle stream is ended after
//! `stream_idle_timeout`, which gives its place back.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{request, text};
use common::*;
use mlx_embed::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient};
use tonic::Code;

const MESSAGES: usize = 10_000;

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mlx-embed serve` with `extra` config, once its model answers.
fn serve(extra: &str) -> (tempfile::TempDir, Killed, String, std::sync::Arc<std::sync::Mutex<String>>) {
    let (dir, path) = q_config(extra);
    let (child, addr, log) = spawn_serve(&path, |_| {});
    let child = Killed(child);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let t0 = Instant::now();
        while c.embed(request("q", vec![text("warm")])).await.is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "the model never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (dir, child, addr, log)
}

fn message(i: usize) -> pb::EmbedRequest {
    pb::EmbedRequest { request_id: i.to_string(), ..request("q", vec![text(&format!("text {i}"))]) }
}

/// grpcurl (Go's gRPC) writes each message of a stream as its own small DATA frame, as bulk
/// loaders do; it reads the messages from stdin.
fn grpcurl_stream(addr: &str, messages: usize) -> (bool, String) {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/grpcurl");
    let mut child = Command::new(bin)
        .args(["-plaintext", "-max-time", "300", "-d", "@", addr, "embedding.v1.EmbeddingService/EmbedStream"])
        .stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped())
        .spawn().expect("grpcurl (scripts/setup.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..messages {
            let line = format!("{{\"model\":\"q\",\"requestId\":\"{i}\",\"items\":[{{\"text\":\"text {i}\"}}]}}\n");
            if stdin.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// The request ids of the answers grpcurl printed, in order.
fn answered_ids(out: &str) -> Vec<usize> {
    out.lines().filter_map(|l| l.trim().strip_prefix("\"requestId\": \"")).map(|v| v.trim_end_matches(['"', ',']).parse().unwrap()).collect()
}

fn assert_all_in_order(ok: bool, out: &str) {
    let ids = answered_ids(out);
    let tail: String = out.lines().rev().take(5).collect::<Vec<_>>().join("\n");
    assert!(ok, "the stream failed after {} answers:\n{tail}", ids.len());
    assert_eq!(ids.len(), MESSAGES, "{tail}");
    assert!(ids.iter().enumerate().all(|(i, id)| i == *id), "answers out of order");
}

#[test]
fn ten_thousand_small_messages_on_one_stream_are_all_answered_in_order() {
    let (_dir, _child, addr, _log) = serve("");
    let (ok, out) = grpcurl_stream(&addr, MESSAGES);
    assert_all_in_order(ok, &out);
}

#[test]
fn a_paced_stream_is_answered_in_full_too() {
    let (_dir, _child, addr, _log) = serve("limits: {max_stream_items_per_second: 4000}");
    let started = Instant::now();
    let (ok, out) = grpcurl_stream(&addr, MESSAGES);
    assert_all_in_order(ok, &out);
    // One second's burst, then 4,000 texts a second: the pace held.
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
}

/// The messages go out one DATA frame each (the sender yields between them) on the same connection
/// as unary calls made meanwhile, which must all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_the_connection_of_a_bulk_stream_are_unaffected() {
    let (_dir, _child, addr, _log) = tokio::task::spawn_blocking(|| serve("")).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut streaming = EmbeddingServiceClient::new(channel.clone());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = tokio::spawn(async move {
        for i in 0..MESSAGES {
            if tx.send(message(i)).is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    });
    let mut answers = streaming.embed_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let unary = tokio::spawn(async move {
        let mut c = EmbeddingServiceClient::new(channel);
        for i in 0..20 {
            let resp = c.embed(request("q", vec![text("beside the stream")])).await;
            assert!(resp.is_ok(), "unary call {i} beside the stream: {:?}", resp.err());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    for i in 0..MESSAGES {
        let a = tokio::time::timeout(Duration::from_secs(60), answers.message()).await
            .unwrap_or_else(|_| panic!("no answer after {i}")).unwrap_or_else(|s| panic!("after {i} answers: {s:?}")).expect("an answer");
        assert_eq!(a.request_id, i.to_string());
    }
    sender.await.unwrap();
    unary.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_too_far_ahead_of_its_answers_is_ended_and_the_connection_lives_on() {
    // Paced to 50 texts a second, with room for about 64 messages ahead.
    let (_dir, _child, addr, log) =
        tokio::task::spawn_blocking(|| serve("limits: {max_stream_items_per_second: 50, max_message_bytes: 16000, max_stream_pending_bytes: 20000}")).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut c = EmbeddingServiceClient::new(channel);
    let reqs: Vec<_> = (0..1000).map(message).collect();
    let mut answers = c.embed_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut answered = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(60), answers.message()).await.expect("the stream stalled") {
            Ok(Some(a)) => {
                assert_eq!(a.request_id, answered.to_string());
                answered += 1;
            }
            Ok(None) => panic!("the stream ended without an error after {answered} answers"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_stream_pending_bytes"), "{}", status.message());
    assert!(answered >= 50, "only {answered} answers before the end");
    let counted = scrape_value(&metrics_addr(&log), r#"mlx_embed_requests_total{rpc="EmbedStream",model="unknown",code="RESOURCE_EXHAUSTED"}"#);
    assert_eq!(counted, Some(1.0), "the stream's end is counted");
    // The same connection still serves.
    assert!(c.embed(request("q", vec![text("after")])).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_ended_and_its_place_given_back() {
    let (_dir, _child, addr, log) =
        tokio::task::spawn_blocking(|| serve("limits: {max_concurrent_requests: 1, stream_idle_timeout: 1s}")).await.unwrap();
    let metrics = metrics_addr(&log);
    let mut c = EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c.embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(message(0)).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().request_id, "0");
    // Open and silent: it holds the only place.
    let status = c.embed(request("q", vec![text("while the stream is open")])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Then it is ended, saying why, while its client still holds it open.
    let status = tokio::time::timeout(Duration::from_secs(10), answers.message()).await
        .expect("the idle stream was never ended").unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("stream_idle_timeout"), "{}", status.message());
    let counted = scrape_value(&metrics, r#"mlx_embed_requests_total{rpc="EmbedStream",model="unknown",code="DEADLINE_EXCEEDED"}"#);
    assert_eq!(counted, Some(1.0), "the stream's end is counted");
    let t0 = Instant::now();
    while c.embed(request("q", vec![text("after the idle stream")])).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5), "the idle stream's place was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(scrape_value(&metrics, "mlx_embed_requests_in_flight"), Some(0.0));
    drop(tx);
}
