//! The engine thread: concurrent requests for two models are batched together (batches > 1 form)
//! and each gets exactly the vectors it gets alone; a model that fails to load is reported and
//! the others serve; a model whose files arrive later loads then; a caller that gives up costs no
//! inference; the memory settings reach MLX and an idle engine hands its cache back.

mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use mlx_embed::engine::{batcher::Limits, EngineHandle, EngineError, Fault, LoadSpec, ModelFiles, ModelStatus, RETIRE_AFTER};
use mlx_embed::mlx::Dtype;
use mlx_embed::models::LoadOptions;
use mlx_embed::tokenize::Truncation;

fn spec(name: &str, fixture: &str) -> LoadSpec {
    LoadSpec {
        name: name.into(),
        files: ModelFiles::Folder(fixtures_dir().join(fixture)),
        options: LoadOptions { dtype: Some(Dtype::Float32), ..Default::default() },
    }
}

async fn ready(engine: &EngineHandle, model: usize) -> ModelStatus {
    let mut rx = engine.subscribe(model);
    let status = rx.wait_for(|s| !matches!(s, ModelStatus::Loading)).await.unwrap().clone();
    status
}

/// Stops and joins the engine thread when the test ends (before the MLX lock is released, so two
/// tests' engines never run MLX at once).
struct Running(EngineHandle);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl std::ops::Deref for Running {
    type Target = EngineHandle;
    fn deref(&self) -> &EngineHandle {
        &self.0
    }
}

fn limits() -> Limits {
    Limits { max_tokens: 4096, max_size: 32, max_wait: Duration::from_millis(20), idle_spin: Duration::ZERO }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_two_models_are_batched_and_exact() {
    // Each test starts its own engine thread; MLX must not run on two at once.
    let _g = mlx_lock();
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny"), spec("g", "gemma-tiny")], limits(), 10_000));
    let mut inputs = Vec::new();
    for (m, fixture) in [(0usize, "qwen3-tiny"), (1, "gemma-tiny")] {
        let ModelStatus::Ready(pre) = ready(&engine, m).await else { panic!("{fixture} failed to load") };
        for text in &reference(&fixtures_dir().join(fixture)).cases[0].texts {
            inputs.push((m, pre.tokenize("", text, None, Truncation::Right).unwrap().ids));
        }
    }
    // Each text alone first (one at a time), then 64 concurrent single-text requests.
    let mut alone = Vec::new();
    for (m, ids) in &inputs {
        alone.push(engine.embed(*m, vec![ids.clone()]).await.unwrap().remove(0));
    }
    let batches_before = engine.stats().batches.load(std::sync::atomic::Ordering::Relaxed);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (engine, (m, ids)) = (engine.0.clone(), inputs[i % inputs.len()].clone());
            tokio::spawn(async move { (i, engine.embed(m, vec![ids]).await.unwrap().remove(0)) })
        })
        .collect();
    for t in tasks {
        let (i, v) = t.await.unwrap();
        let d = max_abs_diff(&v, &alone[i % inputs.len()]);
        assert!(d <= 1e-5, "request {i}: {d:e}");
    }
    let stats = engine.stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed) - batches_before;
    let max = stats.max_batch_size.load(std::sync::atomic::Ordering::Relaxed);
    assert!(max > 1 && batches < 64, "no batching: {batches} batches for 64 requests, largest {max}");
}

#[tokio::test]
async fn a_requests_time_splits_into_waiting_launching_and_inference() {
    let _g = mlx_lock();
    // A lone text waits `max_wait` for company: that is queue time, not launch time.
    let wait = Duration::from_millis(60);
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], Limits { max_wait: wait, ..limits() }, 100));
    let ModelStatus::Ready(pre) = ready(&engine, 0).await else { panic!("qwen3-tiny failed to load") };
    let ids = pre.tokenize("", "how long does a lone query wait", None, Truncation::Right).unwrap().ids;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let e = engine.embed_timed(0, vec![ids.clone()]).await.unwrap();
        let elapsed = t.elapsed();
        assert!(e.queue >= wait - Duration::from_millis(2), "{e:?}");
        // Building and submitting the graph of a tiny model: well under the batch wait.
        assert!(e.launch > Duration::ZERO && e.launch < wait, "{e:?}");
        assert!(e.inference > Duration::ZERO, "{e:?}");
        assert!(e.queue + e.launch + e.inference <= elapsed, "{e:?} in {elapsed:?}");
    }
}

/// Polls `request` once, which hands its texts to the engine (counted as queued until a batch
/// takes them), then waits until a batch has taken them.
async fn hand_over<F: Future>(engine: &EngineHandle, model: usize, request: &mut std::pin::Pin<Box<F>>) {
    std::future::poll_fn(|cx| {
        assert!(request.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    while engine.queued(model) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_device_is_done_with_is_answered_before_the_next_launch() {
    let _g = mlx_lock();
    // On the CPU a batch is computed as it is handed over: its requests are answered before the
    // engine builds the next batch, not after. Launches are slowed down to make the order plain.
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], Limits { max_wait: Duration::ZERO, ..limits() }, 100));
    let ModelStatus::Ready(_) = ready(&engine, 0).await else { panic!("qwen3-tiny failed to load") };
    let t0 = std::time::Instant::now();
    let send = |ids: Vec<u32>| {
        let engine = engine.0.clone();
        tokio::spawn(async move {
            let vectors = engine.embed(0, vec![ids]).await;
            (vectors, t0.elapsed())
        })
    };
    engine.inject_fault(0, Fault::Delay(Duration::from_millis(150)));
    let handle = engine.0.clone();
    let mut first = Box::pin(async move {
        let vectors = handle.embed(0, vec![vec![1, 2, 3]]).await;
        (vectors, t0.elapsed())
    });
    // The first batch is launching, slowly; the second arrives meanwhile.
    hand_over(&engine, 0, &mut first).await;
    engine.inject_fault(0, Fault::Delay(Duration::from_millis(600)));
    let second = send(vec![4, 5, 6, 7]);
    let (a, a_done) = first.await;
    let (b, b_done) = second.await.unwrap();
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert!(a_done + Duration::from_millis(400) < b_done, "first answered at {a_done:?}, second at {b_done:?}");
}

/// User plus system CPU time of the engine threads alive (one here: tests take turns), from
/// Linux's /proc.
fn engine_cpu() -> Duration {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let (Ok(comm), Ok(stat)) = (std::fs::read_to_string(task.path().join("comm")), std::fs::read_to_string(task.path().join("stat"))) else { continue };
        if comm.trim() == "mlx-engine" {
            // utime and stime: the 12th and 13th fields after the command name.
            ticks += stat[stat.rfind(')').unwrap() + 2..].split_whitespace().skip(11).take(2).map(|f| f.parse::<u64>().unwrap()).sum::<u64>();
        }
    }
    Duration::from_millis(ticks * 10) // clock ticks of 10 ms
}

#[tokio::test]
async fn an_idle_engine_polls_for_work_as_long_as_configured_then_sleeps() {
    if !cfg!(target_os = "linux") {
        return eprintln!("skipped on {}: the engine thread's CPU time is read from Linux's /proc", std::env::consts::OS);
    }
    let _g = mlx_lock();
    let spin = Duration::from_millis(400);
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], Limits { max_wait: Duration::ZERO, idle_spin: spin, ..limits() }, 100));
    let ModelStatus::Ready(_) = ready(&engine, 0).await else { panic!("qwen3-tiny failed to load") };
    let alone = engine.embed(0, vec![vec![1, 2, 3]]).await.unwrap();
    // Polling: the engine thread keeps a core busy while this one sleeps.
    let (cpu, t) = (engine_cpu(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let polled = engine_cpu() - cpu;
    assert!(polled >= Duration::from_millis(100), "{polled:?} of CPU in {:?}", t.elapsed());
    // Work that arrives while it polls, and after it sleeps, is served.
    assert_eq!(engine.embed(0, vec![vec![1, 2, 3]]).await.unwrap(), alone);
    tokio::time::sleep(spin + Duration::from_millis(100)).await;
    let (cpu, t) = (engine_cpu(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_millis(250)).await;
    let slept = engine_cpu() - cpu;
    assert!(slept <= Duration::from_millis(30), "{slept:?} of CPU in {:?} after polling ended", t.elapsed());
    assert_eq!(engine.embed(0, vec![vec![1, 2, 3]]).await.unwrap(), alone);
}

#[test]
fn each_padded_batch_shape_is_counted_once() {
    let _g = mlx_lock();
    // At GPU shapes (lengths padded to a multiple of 8, rows to a power of two), as the
    // new-shape metric counts them while serving.
    let opts = LoadOptions { dtype: Some(Dtype::Float32), gpu: gpu(), gpu_shapes: Some(true), ..Default::default() };
    let model = mlx_embed::models::EmbeddingModel::load(&fixtures_dir().join("qwen3-tiny"), opts).unwrap();
    let seq = |n: usize| -> Vec<u32> { (1..=n as u32).collect() };
    let run = |rows: &[Vec<u32>]| model.embed_ids(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap();
    assert_eq!(model.shapes_seen(), 0);
    run(&[seq(5)]); // 1 × 8
    run(&[seq(7)]); // 1 × 8 again
    assert_eq!(model.shapes_seen(), 1);
    run(&[seq(9)]); // 1 × 16
    run(&[seq(3), seq(4), seq(5)]); // 4 × 8
    run(&[seq(8), seq(1), seq(2), seq(6)]); // 4 × 8 again
    assert_eq!(model.shapes_seen(), 3);
}

#[tokio::test]
async fn a_model_that_fails_to_load_is_reported_and_the_others_serve() {
    let _g = mlx_lock();
    let missing = LoadSpec { name: "gone".into(), files: ModelFiles::Folder("/nonexistent".into()), options: LoadOptions::default() };
    let engine = Running(EngineHandle::start(vec![missing, spec("q", "qwen3-tiny")], limits(), 100));
    let ModelStatus::Failed(why) = ready(&engine, 0).await else { panic!("should fail") };
    assert!(why.contains("/nonexistent"), "{why}");
    assert!(matches!(engine.embed(0, vec![vec![1, 2]]).await, Err(EngineError::NotReady(_))));
    assert!(matches!(ready(&engine, 1).await, ModelStatus::Ready(_)));
    assert_eq!(engine.embed(1, vec![vec![5, 6, 560]]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_model_whose_files_come_later_serves_once_provided_while_the_others_already_serve() {
    let _g = mlx_lock();
    let later = LoadSpec { name: "later".into(), files: ModelFiles::Later, options: LoadOptions { dtype: Some(Dtype::Float32), ..Default::default() } };
    let engine = Running(EngineHandle::start(vec![later, spec("q", "qwen3-tiny")], limits(), 100));
    assert!(matches!(ready(&engine, 1).await, ModelStatus::Ready(_)));
    assert!(matches!(engine.status(0), ModelStatus::Downloading(None)));
    assert!(matches!(engine.embed(0, vec![vec![1, 560]]).await, Err(EngineError::NotReady(_))));
    engine.note_download(0, Some("network down".into()));
    assert!(matches!(engine.status(0), ModelStatus::Downloading(Some(ref n)) if n == "network down"));
    assert_eq!(engine.embed(1, vec![vec![5, 6, 560]]).await.unwrap().len(), 1);

    engine.provide(0, fixtures_dir().join("qwen3-tiny")).unwrap();
    let mut rx = engine.subscribe(0);
    rx.wait_for(|s| matches!(s, ModelStatus::Ready(_))).await.unwrap();
    let a = engine.embed(0, vec![vec![5, 6, 560]]).await.unwrap();
    let b = engine.embed(1, vec![vec![5, 6, 560]]).await.unwrap();
    assert_eq!(a, b, "the same checkpoint under two names gives the same vector");
    // A note after loading changes nothing.
    engine.note_download(0, Some("late".into()));
    assert!(matches!(engine.status(0), ModelStatus::Ready(_)));
}

#[tokio::test]
async fn a_full_queue_refuses_more_work() {
    let _g = mlx_lock();
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], limits(), 3));
    ready(&engine, 0).await;
    let err = engine.embed(0, vec![vec![1, 560]; 4]).await.unwrap_err();
    assert!(matches!(err, EngineError::Overloaded { limit: 3, .. }), "{err:?}");
    assert_eq!(engine.embed(0, vec![vec![1, 560]; 3]).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_failing_batch_fails_its_requests_and_the_engine_goes_on() {
    let _g = mlx_lock();
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], limits(), 100));
    ready(&engine, 0).await;
    // An empty sequence is refused by the model: that batch fails, the engine goes on.
    let err = engine.embed(0, vec![vec![]]).await.unwrap_err();
    assert!(matches!(err, EngineError::Failed(_)), "{err:?}");
    assert_eq!(engine.embed(0, vec![vec![7, 560]]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn work_whose_caller_gave_up_is_dropped_before_inference_and_counted() {
    let _g = mlx_lock();
    let slow = Limits { max_tokens: 4096, max_size: 32, max_wait: Duration::from_millis(300), idle_spin: Duration::ZERO };
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], slow, 100));
    ready(&engine, 0).await;
    let stats = engine.stats();
    // The caller waits 20 ms for a batch that would only form after 300 ms, then leaves.
    let gave_up = tokio::time::timeout(Duration::from_millis(20), engine.embed(0, vec![vec![5, 560], vec![6, 560]])).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A later request wakes the engine, which drops the abandoned texts instead of running them.
    engine.embed(0, vec![vec![7, 560]]).await.unwrap();
    assert_eq!(stats.abandoned.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(stats.sequences.load(std::sync::atomic::Ordering::Relaxed), 1, "only the later text ran");
}

#[tokio::test]
async fn an_injected_fault_fails_one_batch_and_the_next_request_is_exact() {
    let _g = mlx_lock();
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny"), spec("g", "gemma-tiny")], limits(), 100));
    ready(&engine, 0).await;
    ready(&engine, 1).await;
    let ids = vec![5, 6, 7, 560];
    let expected = engine.embed(0, vec![ids.clone()]).await.unwrap();
    for (fault, says) in [(Fault::Error, "injected fault"), (Fault::Panic, "panicked")] {
        engine.inject_fault(0, fault);
        match engine.embed(0, vec![ids.clone()]).await {
            Err(EngineError::Failed(why)) => assert!(why.contains(says), "{fault:?}: {why}"),
            other => panic!("{fault:?}: {other:?}"),
        }
        assert_eq!(engine.embed(1, vec![vec![2, 7]]).await.unwrap().len(), 1, "the other model is untouched");
        assert_eq!(engine.embed(0, vec![ids.clone()]).await.unwrap(), expected, "after {fault:?}");
        assert!(matches!(engine.status(0), ModelStatus::Ready(_)));
    }
}

#[tokio::test]
async fn a_model_whose_batches_keep_failing_is_taken_out_of_service_and_the_others_serve() {
    let _g = mlx_lock();
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny"), spec("g", "gemma-tiny")], limits(), 100));
    ready(&engine, 0).await;
    ready(&engine, 1).await;
    for i in 0..RETIRE_AFTER {
        assert!(matches!(engine.status(0), ModelStatus::Ready(_)), "still serving after {i} failures");
        engine.inject_fault(0, if i % 2 == 0 { Fault::Panic } else { Fault::Error });
        assert!(matches!(engine.embed(0, vec![vec![5, 560]]).await, Err(EngineError::Failed(_))));
    }
    let ModelStatus::Failed(why) = engine.status(0) else { panic!("still serving after {RETIRE_AFTER} failures in a row") };
    assert!(why.contains("failed batches in a row"), "{why}");
    assert!(matches!(engine.embed(0, vec![vec![5, 560]]).await, Err(EngineError::NotReady(_))));
    assert_eq!(engine.embed(1, vec![vec![2, 7]]).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_built_as_its_model_is_taken_out_of_service_is_refused_as_not_ready() {
    let _g = mlx_lock();
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], Limits { max_wait: Duration::ZERO, ..limits() }, 100));
    ready(&engine, 0).await;
    for _ in 1..RETIRE_AFTER {
        engine.inject_fault(0, Fault::Error);
        assert!(matches!(engine.embed(0, vec![vec![5, 560]]).await, Err(EngineError::Failed(_))));
    }
    // The last failure shows only when the batch is collected, which happens once the next
    // batch is ready: that one was built for a model now out of service.
    engine.inject_fault(0, Fault::DelayThenFail(Duration::from_millis(150)));
    let handle = engine.0.clone();
    let mut last = Box::pin(async move { handle.embed(0, vec![vec![5, 560]]).await });
    hand_over(&engine, 0, &mut last).await;
    let next = engine.embed(0, vec![vec![2, 7]]).await;
    assert!(matches!(last.await, Err(EngineError::Failed(ref why)) if why.contains("injected")));
    assert!(matches!(next, Err(EngineError::NotReady(_))), "{next:?}");
    assert!(matches!(engine.status(0), ModelStatus::Failed(_)));
}

#[tokio::test]
async fn abort_fails_queued_work_and_stops_the_engine() {
    let _g = mlx_lock();
    let slow = Limits { max_tokens: 4096, max_size: 32, max_wait: Duration::from_secs(30), idle_spin: Duration::ZERO };
    let engine = Running(EngineHandle::start(vec![spec("q", "qwen3-tiny")], slow, 100));
    ready(&engine, 0).await;
    let queued = tokio::spawn({
        let engine = engine.0.clone();
        async move { engine.embed(0, vec![vec![5, 560]]).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = engine.0.clone();
    tokio::task::spawn_blocking(move || e.abort()).await.unwrap();
    assert!(engine.is_stopped());
    assert_eq!(queued.await.unwrap().unwrap_err(), EngineError::Stopped);
    assert_eq!(engine.stats().sequences.load(std::sync::atomic::Ordering::Relaxed), 0, "the queued text never ran");
}

/// Polls `done` every 20 ms until it holds (up to a minute: no timing is asserted).
async fn until(mut done: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(60), "still waiting after a minute");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_limits_reach_mlx_and_an_idle_engine_empties_mlx_cache() {
    use mlx_embed::config::{MemoryConfig, MemorySize};
    use mlx_embed::mlx::memory;
    use std::sync::atomic::Ordering::Relaxed;
    let _g = mlx_lock();
    let default_limit = memory::memory_limit().unwrap();
    let config = MemoryConfig {
        limit: Some(MemorySize::Bytes(3 << 30)),
        cache_limit: Some(MemorySize::Bytes(48 << 20)),
        release_after_idle: Duration::from_millis(300),
    };
    let engine = Running(EngineHandle::start_with_memory(vec![spec("q", "qwen3-tiny")], limits(), 100, config));
    let ModelStatus::Ready(_) = ready(&engine, 0).await else { panic!("qwen3-tiny failed to load") };
    let stats = engine.stats();
    assert_eq!((stats.mlx_memory_limit.load(Relaxed), stats.mlx_cache_limit.load(Relaxed)), (3 << 30, 48 << 20));
    // The release after loading, then a batch whose freed buffers MLX keeps in its cache.
    until(|| stats.memory_releases.load(Relaxed) >= 1).await;
    let releases = stats.memory_releases.load(Relaxed);
    let texts: Vec<Vec<u32>> = (0..16).map(|i| (0..200).map(|t| 1 + (t * 7 + i) % 500).collect()).collect();
    engine.embed(0, texts).await.unwrap();
    let cached = stats.mlx_cache.load(Relaxed);
    assert!(cached > 0 && cached <= 48 << 20, "MLX's cache after a batch: {cached} bytes");
    // Idle for `release_after_idle`: the cache is emptied (and the allocator's pages handed back).
    until(|| stats.memory_releases.load(Relaxed) > releases).await;
    assert_eq!(stats.mlx_cache.load(Relaxed), 0);
    assert_eq!(stats.memory_releases.load(Relaxed), releases + 1, "one release per idle period");
    drop(engine);
    // MLX itself holds the limits the engine set (setting one returns the one before).
    assert_eq!(memory::memory_limit().unwrap(), 3 << 30);
    let cache_limit = memory::set_cache_limit(1 << 30).unwrap();
    assert_eq!(cache_limit, 48 << 20);
    memory::set_memory_limit(default_limit).unwrap();
}
