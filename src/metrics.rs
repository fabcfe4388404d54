//! Prometheus metrics through the `metrics` facade and `metrics-exporter-prometheus`: the names
//! (units in the name, a `model` label wherever one applies), the buckets (latency buckets have
//! a boundary at exactly 25 ms and 2.5 ms steps around it), the series registered at start-up
//! (so `/metrics` is complete before the first request), and the `/metrics` HTTP endpoint.
//!
//! Dashboards and alerts built on these names live in `deploy/prometheus/` and `deploy/grafana/`.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// End-to-end latency of an RPC the service worked on, by `rpc` and `model` (see
/// [`record_request`]).
pub const REQUEST_DURATION: &str = "mlx_embed_request_duration_seconds";
/// Time of one stage of an Embed request, by `model` and `stage` (see [`STAGES`]).
pub const STAGE_DURATION: &str = "mlx_embed_stage_duration_seconds";
/// Finished RPCs by `rpc`, `model` and gRPC status `code` (OK, INVALID_ARGUMENT, …).
pub const REQUESTS: &str = "mlx_embed_requests_total";
/// Embed items by `model` and `kind` (`text` or `vector`).
pub const ITEMS: &str = "mlx_embed_items_total";
/// Tokens run through the model (without padding), by `model`.
pub const TOKENS: &str = "mlx_embed_tokens_total";
/// Sequences per forward pass, by `model`.
pub const BATCH_SIZE: &str = "mlx_embed_batch_size";
/// Padded tokens (longest × count) per forward pass, by `model`.
pub const BATCH_TOKENS: &str = "mlx_embed_batch_tokens";
/// Share of a forward pass's tokens that are padding, by `model`.
pub const BATCH_PADDING: &str = "mlx_embed_batch_padding_ratio";
/// Texts waiting for a forward pass, by `model`.
pub const QUEUE_DEPTH: &str = "mlx_embed_queue_depth";
/// Texts that may wait per model before requests are refused, by `model`.
pub const QUEUE_CAPACITY: &str = "mlx_embed_queue_capacity";
/// Requests in progress.
pub const IN_FLIGHT: &str = "mlx_embed_requests_in_flight";
/// Requests in progress beyond which requests are refused.
pub const IN_FLIGHT_LIMIT: &str = "mlx_embed_requests_in_flight_limit";
/// Texts dropped before inference because their caller had gone, by `model`.
pub const ABANDONED: &str = "mlx_embed_abandoned_texts_total";
/// Padded batch shapes met for the first time while serving, by `model` (see
/// `EmbeddingModel::shapes_seen`).
pub const NEW_SHAPES: &str = "mlx_embed_new_batch_shapes_total";
/// Forward passes that failed (an MLX error or a panic), by `model`.
pub const FAILED_BATCHES: &str = "mlx_embed_failed_batches_total";
/// 1 when the model serves, else 0, by `model`.
pub const MODEL_READY: &str = "mlx_embed_model_ready";
/// How long the last load of the model took, by `model`.
pub const MODEL_LOAD: &str = "mlx_embed_model_load_duration_seconds";
/// Fetches of hub models by `source` and `result` (`ok`, `error`).
pub const PULLS: &str = "mlx_embed_model_pulls_total";
/// The latency target the P95 is held against.
pub const TARGET: &str = "mlx_embed_latency_target_seconds";
/// Resident memory of the process (Linux).
pub const RSS: &str = "process_resident_memory_bytes";
/// MLX allocator memory by `device` and `kind` (`active`, `peak`, `cache`).
pub const MLX_MEMORY: &str = "mlx_embed_mlx_memory_bytes";
/// Requests refused for a missing or wrong API key.
pub const AUTH_FAILURES: &str = "mlx_embed_auth_failures_total";
/// Calls refused before any work, by `reason` (`overloaded`: no place free, or the model's queue
/// full; `draining`: shutting down).
pub const REFUSED: &str = "mlx_embed_requests_refused_total";
/// Always 1, with `version`, `mlx_version` and `device` labels.
pub const BUILD_INFO: &str = "mlx_embed_build_info";
/// MLX's memory limit and cache limit as set at the start, by `device` and `kind` (`memory`, `cache`).
pub const MLX_MEMORY_LIMIT: &str = "mlx_embed_mlx_memory_limit_bytes";
/// Times the engine handed memory back to the system after an idle period.
pub const IDLE_RELEASES: &str = "mlx_embed_idle_releases_total";

/// The stages of an Embed request.
pub const STAGES: [&str; 5] = ["tokenize", "queue", "launch", "inference", "serialize"];

/// Latency buckets (seconds): fine steps up to and around the 25 ms target, coarse beyond.
pub const LATENCY_BUCKETS: [f64; 27] = [
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025,
    0.0275, 0.03, 0.035, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const TOKEN_BUCKETS: [f64; 12] = [16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];
const RATIO_BUCKETS: [f64; 10] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder (once; later calls
/// return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &SIZE_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), &TOKEN_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_PADDING.into()), &RATIO_BUCKETS))
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics stays empty");
        }
        describe();
        handle
    }).clone()
}

fn describe() {
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "End-to-end latency of an RPC, by rpc and model.");
    describe_histogram!(STAGE_DURATION, Unit::Seconds, "Time of one stage of an Embed request (tokenize, queue, launch, inference, serialize).");
    describe_counter!(REQUESTS, "Finished RPCs by rpc, model and gRPC status code.");
    describe_counter!(ITEMS, "Embed items by model and kind (text, vector).");
    describe_counter!(TOKENS, "Tokens run through the model, without padding.");
    describe_histogram!(BATCH_SIZE, "Sequences per forward pass.");
    describe_histogram!(BATCH_TOKENS, "Padded tokens (longest x count) per forward pass.");
    describe_histogram!(BATCH_PADDING, "Share of a forward pass's tokens that are padding.");
    describe_gauge!(QUEUE_DEPTH, "Texts waiting for a forward pass.");
    describe_gauge!(QUEUE_CAPACITY, "Texts that may wait per model before requests are refused.");
    describe_gauge!(IN_FLIGHT, "Requests in progress.");
    describe_gauge!(IN_FLIGHT_LIMIT, "Requests in progress beyond which requests are refused.");
    describe_counter!(ABANDONED, "Texts dropped before inference because their caller had gone.");
    describe_counter!(FAILED_BATCHES, "Forward passes that failed.");
    describe_counter!(NEW_SHAPES, "Padded batch shapes met for the first time while serving (their first forward builds kernels).");
    describe_gauge!(MODEL_READY, "1 when the model serves, else 0.");
    describe_gauge!(MODEL_LOAD, Unit::Seconds, "How long the last load of the model took.");
    describe_counter!(PULLS, "Fetches of hub models by source and result.");
    describe_gauge!(TARGET, Unit::Seconds, "The latency target the P95 is held against.");
    describe_gauge!(RSS, Unit::Bytes, "Resident memory of the process.");
    describe_gauge!(MLX_MEMORY, Unit::Bytes, "MLX allocator memory by device and kind (active, peak, cache).");
    describe_counter!(AUTH_FAILURES, "Requests refused for a missing or wrong API key.");
    describe_counter!(REFUSED, "Calls refused before any work, by reason (overloaded: no place or a full queue; draining).");
    describe_gauge!(BUILD_INFO, "Always 1; the labels carry the version, the MLX version and the device.");
    describe_gauge!(MLX_MEMORY_LIMIT, Unit::Bytes, "MLX's memory limit and cache limit by device and kind (memory, cache).");
    describe_counter!(IDLE_RELEASES, "Times the engine handed memory back to the system after an idle period.");
}

/// What the server registers at start-up.
pub struct Startup<'a> {
    pub models: &'a [String],
    /// Hub sources (`hf://…`) the server fetches.
    pub hub_sources: &'a [String],
    pub max_queue: usize,
    pub max_in_flight: usize,
    pub target: Duration,
    pub mlx_version: String,
    pub device: &'static str,
}

/// Registers every series the server exports, at zero, so dashboards and alerts see them from
/// the start.
pub fn register(s: &Startup<'_>) {
    gauge!(TARGET).set(s.target.as_secs_f64());
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "mlx_version" => s.mlx_version.clone(), "device" => s.device).set(1.0);
    gauge!(IN_FLIGHT).set(0.0);
    counter!(AUTH_FAILURES).absolute(0);
    for reason in ["overloaded", "draining"] {
        counter!(REFUSED, "reason" => reason).absolute(0);
    }
    gauge!(IN_FLIGHT_LIMIT).set(s.max_in_flight as f64);
    // MLX_MEMORY: the engine records it from its start (it runs MLX; it may have loaded models
    // before this runs).
    for source in s.hub_sources {
        for result in ["ok", "error"] {
            counter!(PULLS, "source" => source.clone(), "result" => result).absolute(0);
        }
    }
    for m in s.models {
        let model = m.clone();
        // Registered with no samples: rendered with every bucket at 0.
        let _ = histogram!(REQUEST_DURATION, "rpc" => "Embed", "model" => model.clone());
        counter!(REQUESTS, "rpc" => "Embed", "model" => model.clone(), "code" => "OK").absolute(0);
        for stage in STAGES {
            let _ = histogram!(STAGE_DURATION, "model" => model.clone(), "stage" => stage);
        }
        for kind in ["text", "vector"] {
            counter!(ITEMS, "model" => model.clone(), "kind" => kind).absolute(0);
        }
        counter!(TOKENS, "model" => model.clone()).absolute(0);
        counter!(ABANDONED, "model" => model.clone()).absolute(0);
        counter!(FAILED_BATCHES, "model" => model.clone()).absolute(0);
        counter!(NEW_SHAPES, "model" => model.clone()).absolute(0);
        let _ = histogram!(BATCH_SIZE, "model" => model.clone());
        let _ = histogram!(BATCH_TOKENS, "model" => model.clone());
        let _ = histogram!(BATCH_PADDING, "model" => model.clone());
        gauge!(QUEUE_DEPTH, "model" => model.clone()).set(0.0);
        gauge!(QUEUE_CAPACITY, "model" => model.clone()).set(s.max_queue as f64);
        gauge!(MODEL_READY, "model" => model).set(0.0);
    }
}

/// Records a finished RPC. The latency histogram takes the requests the service worked on
/// (answered, failed or timed out while running); refusals before any work (bad input, unknown
/// or unready model, overload) only count in [`REQUESTS`], or floods of instant refusals would
/// pull the P95 down exactly when the service is overloaded.
pub fn record_request(rpc: &'static str, model: &str, code: tonic::Code, elapsed: Duration) {
    use tonic::Code as C;
    let model = model.to_string();
    if matches!(code, C::Ok | C::DeadlineExceeded | C::Cancelled | C::Internal | C::Unknown | C::DataLoss) {
        histogram!(REQUEST_DURATION, "rpc" => rpc, "model" => model.clone()).record(elapsed.as_secs_f64());
    }
    counter!(REQUESTS, "rpc" => rpc, "model" => model, "code" => code_name(code)).increment(1);
}

/// The status code's name as gRPC writes it (`OK`, `RESOURCE_EXHAUSTED`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Records the MLX allocator's counters (call on the thread that runs MLX).
pub fn record_mlx_memory(device: &'static str, m: crate::mlx::MemoryStats) {
    for (kind, v) in [("active", m.active), ("peak", m.peak), ("cache", m.cache)] {
        gauge!(MLX_MEMORY, "device" => device, "kind" => kind).set(v as f64);
    }
}

/// Resident memory from `/proc/self/status` (Linux; elsewhere the gauge is not set).
fn record_rss() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return };
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    if let Some(kb) = kb {
        gauge!(RSS).set(kb * 1024.0);
    }
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` until the task is dropped; runs the exporter's
/// upkeep.
pub async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(answer(&handle, req.method(), req.uri().path())) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

fn answer(handle: &PrometheusHandle, method: &http::Method, path: &str) -> http::Response<Full<Bytes>> {
    let response = http::Response::builder();
    if path != "/metrics" {
        return response.status(http::StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"metrics are at GET /metrics\n")))
            .expect("a valid response");
    }
    match *method {
        // HEAD gets GET's answer: hyper sends its headers (the length included) and no body.
        http::Method::GET | http::Method::HEAD => {
            record_rss();
            response
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(handle.render())))
        }
        _ => response
            .status(http::StatusCode::METHOD_NOT_ALLOWED)
            .header(http::header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::from_static(b"metrics are at GET /metrics\n"))),
    }
    .expect("a valid response")
}
