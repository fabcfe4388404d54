//! Wiring: config → engine → gRPC server with health (per model) and reflection (v1 and v1alpha).
//!
//! [`serve`] takes the listener and the shutdown signal as arguments, so tests bind port 0 and
//! stop the server themselves.

use std::future::Future;
use std::path::Path;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::config::{Config, DeviceChoice, DtypeChoice, Source};
use crate::engine::{batcher, EngineHandle, LoadSpec, ModelFiles, ModelStatus};
use crate::grpc::admission::{Admission, Drain};
use crate::grpc::auth::Auth;
use crate::grpc::pb::{self, embedding_service_server::EmbeddingServiceServer};
use crate::grpc::service::Service;
use crate::mlx::{self, Dtype};
use crate::models::LoadOptions;
use crate::registry::background::{self, Wanted};
use crate::registry::{HubRef, HubSettings, Origin, Resolved};

/// The engine's load list for `config` (relative folders resolved against `base`), each model's
/// origin, and the hub references still to fetch (by model index).
pub fn load_specs(config: &Config, base: &Path) -> (Vec<LoadSpec>, Vec<Origin>, Vec<(usize, HubRef)>) {
    let gpu_available = mlx::gpu_is_available();
    let mut fetches = Vec::new();
    let (specs, origins) = config.models.iter().enumerate().map(|(i, m)| {
        let origin = Origin::new(m.source.clone());
        let files = match m.resolved_source(base) {
            _ if m.device == DeviceChoice::Gpu && !gpu_available => {
                ModelFiles::Refused("device: gpu, but MLX has no GPU backend here".to_string())
            }
            // A missing folder is reported by the load itself, naming the path.
            Source::Local(p) => {
                let _ = origin.resolved.set(Resolved { dir: p.clone(), commit: None, files: vec![] });
                ModelFiles::Folder(p)
            }
            Source::Hub(r) => {
                fetches.push((i, r));
                ModelFiles::Later
            }
        };
        let gpu = match m.device {
            DeviceChoice::Auto => gpu_available,
            DeviceChoice::Cpu => false,
            DeviceChoice::Gpu => true,
        };
        let dtype = match m.dtype {
            DtypeChoice::Auto => None,
            DtypeChoice::F32 => Some(Dtype::Float32),
            DtypeChoice::Bf16 => Some(Dtype::Bfloat16),
        };
        (LoadSpec { name: m.name.clone(), files, options: LoadOptions { dtype, gpu, compile: m.compile, compile_min_tokens: m.compile_min_tokens, ..Default::default() } }, origin)
    }).unzip();
    (specs, origins, fetches)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Starts the engine thread for `config`'s models, and the fetches of hub models in the
/// background; returns the engine with each model's origin.
pub fn start_engine(config: &Config, base: &Path, hub: &HubSettings) -> (EngineHandle, Vec<Origin>) {
    // The recorder comes first: the engine's metric handles bind to it when created.
    crate::metrics::install();
    let (specs, origins, fetches) = load_specs(config, base);
    let limits = batcher::Limits {
        max_tokens: config.batching.max_batch_tokens,
        max_size: config.batching.max_batch_size,
        max_wait: config.batching.max_wait,
        idle_spin: config.batching.idle_spin,
    };
    let engine = EngineHandle::start_with_memory(specs, limits, config.batching.max_queue, config.memory.clone());
    // One fetch thread per repository, one fetch per revision.
    let mut by_repo: Vec<(String, Vec<Wanted>)> = Vec::new();
    for (i, r) in fetches {
        let repo = match by_repo.iter().position(|(name, _)| *name == r.repo) {
            Some(k) => &mut by_repo[k].1,
            None => {
                by_repo.push((r.repo.clone(), Vec::new()));
                &mut by_repo.last_mut().expect("just pushed").1
            }
        };
        match repo.iter_mut().find(|w| w.r == r) {
            Some(w) => w.models.push((i, origins[i].clone())),
            None => repo.push(Wanted { r, models: vec![(i, origins[i].clone())] }),
        }
    }
    for (repo, wanted) in by_repo {
        background::spawn(engine.clone(), repo, wanted, hub.clone());
    }
    (engine, origins)
}

/// Serves `config` on `listener` until `shutdown` completes, then drains: health turns
/// NOT_SERVING, new calls get UNAVAILABLE, calls in progress and queued work finish, within
/// `shutdown.grace_period`. `metrics` serves `GET /metrics` (Prometheus) when given. TLS files
/// are read relative to `base`.
pub async fn serve(
    config: Config,
    base: &Path,
    hub: &HubSettings,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = config.tls.as_ref().map(|t| tls_config(t, base)).transpose()?;
    let (engine, origins) = start_engine(&config, base, hub);
    serve_engine(config, engine, origins, listener, metrics, tls, shutdown).await
}

/// The rustls settings for `tls`: the server's identity and, for mutual TLS, the client CA.
pub fn tls_config(tls: &crate::config::TlsConfig, base: &Path) -> Result<ServerTlsConfig, ServeError> {
    let read = |field: &str, p: &Path| {
        let path = base.join(p);
        std::fs::read(&path).map_err(|e| ServeError::Tls(format!("tls.{field}: cannot read {}: {e}", path.display())))
    };
    let identity = Identity::from_pem(read("cert_file", &tls.cert_file)?, read("key_file", &tls.key_file)?);
    let mut config = ServerTlsConfig::new().identity(identity).timeout(std::time::Duration::from_secs(10));
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?));
    }
    Ok(config)
}

/// [`serve`] with an engine already started (tests keep a handle to read its counters).
pub async fn serve_engine(
    config: Config,
    engine: EngineHandle,
    origins: Vec<Origin>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let handle = crate::metrics::install();
    let names: Vec<String> = engine.model_names().map(String::from).collect();
    let hub_sources: Vec<String> = config.models.iter().filter_map(|m| match m.resolved_source(Path::new("/")) {
        Source::Hub(r) => Some(r.to_string()),
        Source::Local(_) => None,
    }).collect();
    crate::metrics::register(&crate::metrics::Startup {
        models: &names,
        hub_sources: &hub_sources,
        max_queue: config.batching.max_queue,
        max_in_flight: config.limits.max_concurrent_requests,
        target: config.metrics.latency_target,
        mlx_version: mlx::version(),
        device: if mlx::gpu_is_available() { "gpu" } else { "cpu" },
    });
    let exporter = match metrics {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, "metrics at GET /metrics");
            Some(tokio::spawn(crate::metrics::serve(l, handle)))
        }
        None => None,
    };
    let drain = Drain::default();
    let (reporter, health) = crate::grpc::health::health_reporter();
    reporter.set_service_status("", ServingStatus::Serving).await;
    for (i, name) in engine.model_names().enumerate() {
        reporter.set_service_status(name, ServingStatus::NotServing).await;
        let (mut rx, reporter, name, drain) = (engine.subscribe(i), reporter.clone(), name.to_string(), drain.clone());
        tokio::spawn(async move {
            let ready = ::metrics::gauge!(crate::metrics::MODEL_READY, "model" => name.clone());
            loop {
                let serving = matches!(*rx.borrow_and_update(), ModelStatus::Ready(_));
                ready.set(if serving { 1.0 } else { 0.0 });
                let status = if serving && !drain.is_draining() { ServingStatus::Serving } else { ServingStatus::NotServing };
                reporter.set_service_status(&name, status).await;
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can show BadRequest and RetryInfo.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure()).build_v1()?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure()).build_v1alpha()?;

    let max_msg = config.limits.max_message_bytes;
    let stopper = engine.clone();
    let service = EmbeddingServiceServer::new(Service::new(engine, &config, origins, drain.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);

    let addr = listener.local_addr()?;
    tracing::info!(%addr, models = config.models.len(), "serving");
    let (health_reporter, draining, names) = (reporter.clone(), drain.clone(), names.clone());
    let grace = config.shutdown.grace_period;
    let (signalled, grace_started) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        draining.start();
        tracing::info!(grace_period = ?grace, "shutting down: finishing requests in flight");
        for name in std::iter::once("").chain(names.iter().map(String::as_str)) {
            health_reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        let _ = signalled.send(());
    };
    let auth = config.auth.enabled().then(|| {
        tracing::info!(keys = config.auth.keys.0.len(), exempt_health = config.auth.exempt_health,
            exempt_reflection = config.auth.exempt_reflection, "API keys required");
        Auth::new(&config.auth.keys.0, config.auth.exempt_health, config.auth.exempt_reflection)
    });
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        tracing::info!(mutual = config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()), "TLS on");
        builder = builder.tls_config(tls)?;
    }
    let served = builder
        .layer(tower::util::option_layer(auth))
        .layer(Admission::new(&config.limits, drain))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener), shutdown);
    // Served to the end, or cut off once the grace period after the signal is over.
    let grace_over = async move {
        match grace_started.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    let served = tokio::select! {
        served = served => Some(served),
        () = grace_over => None,
    };
    // Also after a server error: the process must not exit while MLX is busy.
    match served {
        Some(_) => tokio::task::spawn_blocking(move || stopper.shutdown()).await.ok(),
        None => {
            tracing::warn!(grace_period = ?grace, "grace period over: closing the calls still open");
            tokio::task::spawn_blocking(move || stopper.abort()).await.ok()
        }
    };
    if let Some(e) = exporter {
        e.abort();
    }
    tracing::info!("stopped");
    Ok(served.transpose()?.unwrap_or(()))
}

/// The accepted connections, with Nagle's algorithm off: small responses are sent at once
/// instead of waiting on the client's delayed ACK (about 40 ms on Linux), and TCP keepalive on so
/// dead clients are noticed.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}
