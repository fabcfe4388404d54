//! The service under overload, expired deadlines, shutdown, disconnects and faults, against
//! `mlx-embed serve` as a process (and one in-process server for the fault hook): excess calls are
//! refused at once with RetryInfo while admitted ones get their exact vectors; expired work never
//! reaches the model; SIGTERM loses no accepted call and the process exits within its grace
//! period; a client that goes away frees its place; an injected fault fails one batch only; a
//! deadline that passes is DEADLINE_EXCEEDED and counted, however late the request's end comes;
//! refusals for a full queue are counted as refusals for overload.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::raw::{self, RawCall};
use common::server::{request, text};
use common::*;
use mlx_embed::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

/// The fixture's `query` case: each text with its reference vector.
fn cases() -> Vec<(String, Vec<f32>)> {
    let case = reference(&fixtures_dir().join("qwen3-tiny")).cases.into_iter().find(|c| c.prompt_name.as_deref() == Some("query")).unwrap();
    case.texts.into_iter().zip(case.embeddings).collect()
}

fn query(t: &str) -> pb::EmbedRequest {
    pb::EmbedRequest { prompt_name: "query".into(), ..request("q", vec![text(t)]) }
}

/// Asserts `resp` carries `want` (the reference vector) for its single item.
fn assert_exact(resp: &pb::EmbedResponse, want: &[f32], what: &str) {
    let d = max_abs_diff(&resp.embeddings[0].values, want);
    assert!(d <= 1e-5, "{what}: {d:e} from the reference");
}

async fn connect(addr: &str) -> EmbeddingServiceClient<Channel> {
    let mut c = EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let t0 = Instant::now();
    while c.embed(query("warm")).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the model never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c
}

/// Whether a failed call is one the server refused (UNAVAILABLE) or one the client never sent
/// because the server had closed the connection (tonic reports CANCELLED, from hyper's
/// "connection closed" for a request still waiting to go out).
fn never_sent_or_refused(status: &tonic::Status) -> bool {
    use std::error::Error;
    let unsent = status.code() == Code::Cancelled
        && status.source().is_some_and(|e| format!("{e:?}").contains(r#"Canceled, "connection closed""#));
    status.code() == Code::Unavailable || unsent
}

fn sigterm(child: &Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

/// Waits for `child` to exit (at most `limit`); returns how long that took.
fn wait_exit(child: &mut Child, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            return t0.elapsed();
        }
        if t0.elapsed() > limit {
            child.kill().ok();
            panic!("still running {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_times_the_concurrency_limit_refuses_the_excess_with_retry_info_and_admitted_calls_are_exact() {
    // Batches wait 300 ms for company, so the four admitted calls hold their places while the
    // other 36 arrive.
    let (_dir, path) = q_config("limits: {max_concurrent_requests: 4}\nbatching: {max_wait: 300ms}");
    let (mut child, addr, log) = spawn_serve(&path, |_| {});
    let c = connect(&addr).await;
    let cases = cases();
    let calls: Vec<_> = (0..40).map(|i| {
        let (mut c, (t, want)) = (c.clone(), cases[i % cases.len()].clone());
        tokio::spawn(async move { (c.embed(query(&t)).await, want) })
    }).collect();
    let (mut admitted, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            (Ok(resp), want) => {
                assert_exact(resp.get_ref(), &want, "an admitted call");
                admitted += 1;
            }
            (Err(status), _) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let retry = status.get_error_details().retry_info().and_then(|r| r.retry_delay);
                assert!(retry.is_some_and(|d| d > Duration::ZERO), "no RetryInfo: {status:?}");
                refused += 1;
            }
        }
    }
    assert!(admitted >= 4 && refused >= 30, "{admitted} admitted, {refused} refused");
    let metrics = metrics_addr(&log);
    assert_eq!(scrape_value(&metrics, r#"mlx_embed_requests_refused_total{reason="overloaded"}"#), Some(refused as f64));
    // Refused before their message was read, so before their model was known.
    assert_eq!(scrape_value(&metrics, r#"mlx_embed_requests_total{rpc="Embed",model="unknown",code="RESOURCE_EXHAUSTED"}"#), Some(refused as f64));
    assert_eq!(scrape_value(&metrics, "mlx_embed_requests_in_flight"), Some(0.0));
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_whose_deadline_passed_never_reaches_the_model_and_is_counted() {
    let (_dir, path) = q_config("batching: {max_wait: 300ms}");
    let (mut child, addr, log) = spawn_serve(&path, |_| {});
    let mut c = connect(&addr).await;
    let metrics = metrics_addr(&log);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let batches = || scrape_value(&metrics, r#"mlx_embed_batch_size_count{model="q"}"#).unwrap();
    let before = batches();

    // Three texts with a 50 ms deadline, for a batch that would only start after 300 ms.
    let mut req = tonic::Request::new(request("q", vec![text("one"), text("two"), text("three")]));
    req.set_timeout(Duration::from_millis(50));
    let status = c.embed(req).await.unwrap_err();
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(scrape_value(&metrics, r#"mlx_embed_abandoned_texts_total{model="q"}"#), Some(3.0));
    assert_eq!(batches(), before, "a forward pass ran for expired work");

    // The next call is served, exactly.
    let (t, want) = &cases()[1];
    assert_exact(c.embed(query(t)).await.unwrap().get_ref(), want, "after the expired call");
    assert_eq!(batches(), before + 1.0);
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(20));
}

/// A call whose request ends in a later write than its headers gets DEADLINE_EXCEEDED from the
/// server when its deadline passes, whether the message came just before the deadline (and waits
/// in the queue), around it, or after it (and was never read), and each is counted under that
/// code; none is answered CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_is_deadline_exceeded_and_counted_however_late_the_request_ends() {
    // Batches wait 300 ms for company: a message that arrives in time is still queued when its
    // 200 ms deadline passes.
    let (_dir, path) = q_config("batching: {max_wait: 300ms}");
    let (mut child, addr, log) = spawn_serve(&path, |_| {});
    connect(&addr).await;
    let metrics = metrics_addr(&log);
    let counted = |code: &str| scrape_sum(&metrics, "mlx_embed_requests_total", &[r#"rpc="Embed""#, code]);
    let before = (counted(r#"code="DEADLINE_EXCEEDED""#), counted(r#"code="CANCELLED""#));
    let delays = [150, 190, 195, 199, 200, 201, 205, 210, 250, 400];
    let calls = delays.map(|ms| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let message = query("late").encode_to_vec();
            let call = RawCall { path: "/embedding.v1.EmbeddingService/Embed", timeout: Some("200m"), message, after: Duration::from_millis(ms) };
            raw::call(&addr, call).await
        })
    });
    for (ms, call) in delays.iter().zip(calls) {
        let answer = call.await.unwrap();
        assert_eq!(answer.code, Code::DeadlineExceeded, "the message {ms} ms after the headers: {answer:?}");
        assert!(answer.message.contains("deadline"), "{answer:?}");
    }
    assert_eq!(counted(r#"code="DEADLINE_EXCEEDED""#) - before.0, delays.len() as f64);
    assert_eq!(counted(r#"code="CANCELLED""#), before.1);
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(20));
}

/// A call refused because its model's queue is full counts among the refusals for overload (as
/// one refused at admission does), and under RESOURCE_EXHAUSTED for its model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_for_a_full_queue_are_counted_as_refused_for_overload() {
    // Two texts fill the queue for the 500 ms their batch waits for company.
    let (_dir, path) = q_config("limits: {max_items_per_request: 2}\nbatching: {max_queue: 2, max_wait: 500ms}");
    let (mut child, addr, log) = spawn_serve(&path, |_| {});
    let mut c = connect(&addr).await;
    let metrics = metrics_addr(&log);
    let mut filler = c.clone();
    let filling = tokio::spawn(async move { filler.embed(request("q", vec![text("one"), text("two")])).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..8 {
        let status = c.embed(query("no room")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "call {i}: {status:?}");
        assert!(status.get_error_details().retry_info().is_some(), "no RetryInfo: {status:?}");
    }
    filling.await.unwrap().unwrap();
    assert_eq!(scrape_value(&metrics, r#"mlx_embed_requests_refused_total{reason="overloaded"}"#), Some(8.0));
    assert_eq!(scrape_value(&metrics, r#"mlx_embed_requests_total{rpc="Embed",model="q",code="RESOURCE_EXHAUSTED"}"#), Some(8.0));
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_burst_loses_no_accepted_call_and_the_process_exits_in_time() {
    let (_dir, path) = q_config("shutdown: {grace_period: 10s}");
    let (mut child, addr, _log) = spawn_serve(&path, |_| {});
    let c = connect(&addr).await;
    let cases = cases();
    let stop = Instant::now() + Duration::from_secs(2);
    // Eight clients send without pause, before and after the signal, until two seconds pass or
    // the server refuses them.
    let clients: Vec<_> = (0..8).map(|k| {
        let (mut c, cases) = (c.clone(), cases.clone());
        tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            for i in k.. {
                let (t, want) = &cases[i % cases.len()];
                match c.embed(query(t)).await {
                    Ok(resp) => {
                        assert_exact(resp.get_ref(), want, "a call answered during shutdown");
                        ok += 1;
                    }
                    Err(status) => {
                        assert!(never_sent_or_refused(&status), "{status:?}");
                        refused += 1;
                    }
                }
                if Instant::now() > stop || refused > 0 {
                    break;
                }
            }
            (ok, refused)
        })
    }).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&child);
    let signalled = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    for client in clients {
        let (o, r) = client.await.unwrap();
        (ok, refused) = (ok + o, refused + r);
    }
    assert!(ok > 8, "only {ok} calls answered");
    assert!(refused > 0, "no call was refused after SIGTERM: the burst ended too early");
    let exited = wait_exit(&mut child, Duration::from_secs(20)) + signalled.elapsed();
    assert!(exited < Duration::from_secs(10), "exited {exited:?} after SIGTERM, past the grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_gets_unavailable_after_sigterm_and_an_idle_one_is_cut_at_the_grace_period() {
    // A stream that sends after the signal is told UNAVAILABLE, which ends it: the server exits
    // without waiting out its (long) grace period.
    let (_dir, path) = q_config("shutdown: {grace_period: 60s}");
    let (mut child, addr, _log) = spawn_serve(&path, |_| {});
    let mut c = connect(&addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c.embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let (t, want) = &cases()[2];
    tx.send(query(t)).await.unwrap();
    assert_exact(&answers.message().await.unwrap().unwrap(), want, "before the signal");
    sigterm(&child);
    let signalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(query(t)).await.unwrap();
    let status = answers.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(tx);
    wait_exit(&mut child, Duration::from_secs(20));
    assert!(signalled.elapsed() < Duration::from_secs(20));

    // A stream that stays open and silent is cut once the grace period is over.
    let (_dir, path) = q_config("shutdown: {grace_period: 2s}");
    let (mut child, addr, log) = spawn_serve(&path, |_| {});
    let mut c = connect(&addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c.embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(query(t)).await.unwrap();
    assert_exact(&answers.message().await.unwrap().unwrap(), want, "before the signal");
    sigterm(&child);
    let signalled = Instant::now();
    let exited = wait_exit(&mut child, Duration::from_secs(20)) + signalled.elapsed();
    assert!(exited >= Duration::from_millis(1900), "exited after {exited:?}, before the grace period ended");
    assert!(exited < Duration::from_secs(10), "exited {exited:?} after SIGTERM");
    assert!(log.lock().unwrap().contains("grace period over"), "{}", log.lock().unwrap());
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_one_place_until_its_client_goes_away() {
    let (_dir, path) = q_config("limits: {max_concurrent_requests: 1}");
    let (mut child, addr, log) = spawn_serve(&path, |_| {});
    let metrics = metrics_addr(&log);
    let mut unary = connect(&addr).await;
    {
        // Its own connection, closed when this block ends.
        let mut c = EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut answers = c.embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let (t, want) = &cases()[3];
        tx.send(query(t)).await.unwrap();
        assert_exact(&answers.message().await.unwrap().unwrap(), want, "on the stream");
        let status = unary.embed(query("while the stream is open")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(scrape_value(&metrics, "mlx_embed_requests_in_flight"), Some(1.0));
    }
    let t0 = Instant::now();
    while unary.embed(query("after the stream's client left")).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the stream's place was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scrape_value(&metrics, "mlx_embed_requests_in_flight"), Some(0.0));
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_fault_fails_one_call_with_internal_and_the_next_is_exact() {
    use mlx_embed::engine::Fault;
    let _g = mlx_lock();
    let (dir, path) = q_config("limits: {max_text_bytes: 64}");
    let config = mlx_embed::config::Config::load(&path).unwrap();
    let hub = mlx_embed::registry::HubSettings {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: dir.path().join("hub"),
        token: None,
        offline: true,
    };
    let (engine, origins) = mlx_embed::grpc::server::start_engine(&config, dir.path(), &hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mlx_embed::grpc::server::serve_engine(config, engine.clone(), origins, listener, None, None, async {
        stopped.await.ok();
    }));
    let mut c = connect(&addr).await;
    let (t, want) = &cases()[4];
    for fault in [Fault::Error, Fault::Panic] {
        engine.inject_fault(0, fault);
        let status = c.embed(query(t)).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{fault:?}: {status:?}");
        assert_exact(c.embed(query(t)).await.unwrap().get_ref(), want, "after the fault");
    }
    // Texts over limits.max_text_bytes are refused, naming the item.
    let status = c.embed(request("q", vec![text("short"), text(&"long ".repeat(13))])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let field = status.get_error_details().bad_request().unwrap().field_violations[0].field.clone();
    assert_eq!(field, "items[1].text");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
