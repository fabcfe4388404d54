//! Server configuration and model registry from YAML (`config.example.yaml`).
//!
//! Unknown fields and bad values are refused with the file, line and field named. Durations are
//! written `250ms`, `2s`, `1m`. Relative model paths are relative to the config file's folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::HubRef;

/// A configuration error: `file:line:column: field: message`.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub location: Option<(usize, usize)>,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Threads that run the gRPC and metrics connections (request decoding, response encoding,
    /// TLS). The engine has a thread of its own and tokenizing runs on a pool of its own.
    #[serde(default = "default_io_threads")]
    pub io_threads: usize,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub batching: Batching,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    pub models: Vec<ModelConfig>,
}

/// TLS for the gRPC port (rustls). With `client_ca_file`, clients must present a certificate
/// signed by that CA (mutual TLS). Paths are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
}

/// What happens on SIGTERM or Ctrl-C: health turns NOT_SERVING, new calls get UNAVAILABLE, calls
/// in progress and queued work finish; after `grace_period` the rest is cut off and the process
/// exits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "duration")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_period: Duration::from_secs(20) }
    }
}

/// API keys. With a key source set, every RPC needs `authorization: Bearer <key>` (health checks
/// and reflection may stay open).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file with one key per line (`#` at a line's start or after a blank starts a comment;
    /// `grpc::auth::parse_key_file`); relative to the config file.
    pub api_keys_file: Option<PathBuf>,
    /// An environment variable holding keys separated by commas.
    pub api_keys_env: Option<String>,
    pub exempt_health: bool,
    pub exempt_reflection: bool,
    /// The keys read from those sources (filled in by the command line, never from YAML).
    #[serde(skip)]
    pub keys: ApiKeys,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { api_keys_file: None, api_keys_env: None, exempt_health: true, exempt_reflection: true, keys: ApiKeys::default() }
    }
}

impl AuthConfig {
    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        self.api_keys_file.is_some() || self.api_keys_env.is_some()
    }
}

/// API keys; `Debug` shows only how many there are.
#[derive(Clone, Default)]
pub struct ApiKeys(pub Vec<String>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`); `null` turns it off.
    pub listen: Option<String>,
    /// The latency target the P95 is held against (exported as a gauge for alerts and panels).
    #[serde(with = "duration")]
    pub latency_target: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: Some("127.0.0.1:9464".into()), latency_target: Duration::from_millis(25) }
    }
}

fn default_listen() -> String {
    "127.0.0.1:50051".into()
}

/// Two: with one thread per core (tokio's default) lone queries' P95 was 0.1–1.9 ms higher in
/// three comparisons on two 16-core GPU hosts, the engine thread's launch slower with the other
/// threads about, and 2,000 queries/s were served no better (BENCHMARKS.md, "The allocator and
/// the I/O threads").
fn default_io_threads() -> usize {
    2
}

/// What one queued `EmbedStream` message counts against `max_stream_pending_bytes` beyond its
/// encoded size (h2 charges a small frame about as much).
pub const STREAM_MESSAGE_OVERHEAD: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Items in one Embed request (texts and vectors together).
    pub max_items_per_request: usize,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Requests served at the same time; more are refused (RESOURCE_EXHAUSTED).
    pub max_concurrent_requests: usize,
    /// Longest a request may take when the client sets no deadline.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Longest text (or instruction) accepted, in bytes of UTF-8.
    pub max_text_bytes: usize,
    /// Texts per second one EmbedStream may send (beyond a one-second burst its messages wait
    /// their turn; nothing is refused). `null`: no limit.
    pub max_stream_items_per_second: Option<u32>,
    /// Bytes of messages one EmbedStream may have sent ahead of their answers (each message counted
    /// as its encoded size plus 256). The server reads a stream's messages as they arrive, so that
    /// HTTP/2's guard against floods of small frames never closes the connection; a stream that
    /// runs further ahead is ended with RESOURCE_EXHAUSTED after the answers before it.
    pub max_stream_pending_bytes: usize,
    /// An EmbedStream with no answer owed that sends nothing for this long is ended with
    /// DEADLINE_EXCEEDED, freeing its place among `max_concurrent_requests`.
    #[serde(with = "duration")]
    pub stream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_items_per_request: 512,
            max_message_bytes: 16 << 20,
            max_concurrent_requests: 512,
            request_timeout: Duration::from_secs(30),
            max_text_bytes: 1 << 20,
            max_stream_items_per_second: None,
            max_stream_pending_bytes: 64 << 20,
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Batching {
    /// Padded tokens (longest × count) in one forward pass.
    pub max_batch_tokens: usize,
    /// Sequences in one forward pass.
    pub max_batch_size: usize,
    /// How long a short queue waits for more work before running.
    #[serde(with = "duration")]
    pub max_wait: Duration,
    /// Sequences waiting per model; beyond it requests are refused (RESOURCE_EXHAUSTED).
    pub max_queue: usize,
    /// When it has nothing left to do (no batch queued or running), the engine thread polls for
    /// new work this long before it sleeps, so that a request arriving meanwhile is taken at once
    /// by a thread that is still running (one core busy while it lasts; a lone request then
    /// still waits `max_wait` for company). 0s: sleep at once.
    #[serde(with = "duration")]
    pub idle_spin: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching { max_batch_tokens: 16384, max_batch_size: 64, max_wait: Duration::from_millis(2), max_queue: 8192, idle_spin: Duration::ZERO }
    }
}

/// How much memory MLX may hold, and when the process gives memory back (README, "Memory").
/// Sizes are bytes (`536870912`, `512MiB`, `2GB`) or a share of the device's memory (`25%`):
/// the GPU's when MLX has one (on a Mac, the unified memory), else the machine's RAM or the
/// container's memory limit, whichever is smaller.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// MLX's memory limit (`mlx::core::set_memory_limit`): while MLX's arrays take more, it
    /// waits for running work before it hands over more, and its GPU allocators free their cache
    /// first. A guideline, not a cap: an allocation past it still succeeds if the device has room.
    /// `null`: 25% of the memory of a GPU; on the CPU MLX's own (80% of RAM).
    pub limit: Option<MemorySize>,
    /// Freed buffers MLX keeps for reuse (`mlx::core::set_cache_limit`); beyond it they go back
    /// to the allocator. `null`: 1 GiB on a GPU (MLX's own default there is its memory limit,
    /// nearly the whole card), 32 MiB on the CPU (MLX's own).
    pub cache_limit: Option<MemorySize>,
    /// Once the engine has had no work for this long, MLX's cache is emptied and the process's
    /// allocator hands its free pages back to the system. `0s`: never.
    #[serde(with = "duration")]
    pub release_after_idle: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { limit: None, cache_limit: default_cache_limit(), release_after_idle: default_release_after_idle() }
    }
}

/// Chosen per device by the engine (`engine::memory`).
fn default_cache_limit() -> Option<MemorySize> {
    None
}

fn default_release_after_idle() -> Duration {
    Duration::from_secs(2)
}

/// An amount of memory: bytes, or a share of the device's memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemorySize {
    Bytes(u64),
    /// Between 0 and 1.
    Share(f64),
}

impl MemorySize {
    /// Bytes, given the device's memory (`None`: unknown, so a share cannot be worked out).
    pub fn bytes(self, device: Option<u64>) -> Option<u64> {
        match self {
            MemorySize::Bytes(b) => Some(b),
            MemorySize::Share(s) => device.map(|d| (d as f64 * s) as u64),
        }
    }

    /// `512MiB`, `2GB`, `1048576`, `25%` (units: B, KB, MB, GB, TB and KiB, MiB, GiB, TiB).
    pub fn parse(text: &str) -> Option<MemorySize> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().ok()?;
            return (p > 0.0 && p <= 100.0).then_some(MemorySize::Share(p / 100.0));
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return None,
        };
        let v: f64 = num.parse().ok()?;
        let bytes = v * scale as f64;
        (bytes.is_finite() && bytes < u64::MAX as f64).then_some(MemorySize::Bytes(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MemorySize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size (e.g. 536870912, 512MiB, 2GB, 25%)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MemorySize, E> {
                Ok(MemorySize::Bytes(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MemorySize, E> {
                MemorySize::parse(v).ok_or_else(|| E::custom(format!("`{v}` is not a size (e.g. 536870912, 512MiB, 2GB, 25%)")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    #[default]
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Gpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TruncationChoice {
    /// Keep the beginning.
    #[default]
    End,
    /// Keep the end.
    Start,
    /// Refuse over-long texts.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use.
    pub name: String,
    /// A local folder in Hugging Face layout, or `hf://org/name[@revision]` for a hub repository
    /// (revision: a branch, tag or commit; `main` by default).
    pub source: String,
    #[serde(default)]
    pub dtype: DtypeChoice,
    #[serde(default)]
    pub device: DeviceChoice,
    /// Prompt name used when a request selects none (overrides the model's own default).
    pub default_prompt: Option<String>,
    /// Matryoshka sizes clients may ask for (default: the model's own list).
    pub allowed_dimensions: Option<Vec<u32>>,
    /// Token limit per text (default and upper bound: the model's).
    pub max_tokens: Option<usize>,
    /// What to do with over-long texts when a request does not say.
    #[serde(default)]
    pub truncation: TruncationChoice,
    /// Compile the encoder (`mlx::core::compile`: fused kernels, one trace per padded batch
    /// shape). Default: on a GPU only.
    pub compile: Option<bool>,
    /// The smallest batch (rows × padded tokens) that runs compiled (default: 1024 on a GPU,
    /// every batch on the CPU).
    pub compile_min_tokens: Option<usize>,
}

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Hub(HubRef),
}

impl ModelConfig {
    /// The source, with a relative folder resolved against `base` (the config file's folder).
    /// `hf://` references are checked by [`Config::parse`].
    pub fn resolved_source(&self, base: &Path) -> Source {
        match self.source.strip_prefix(HUB_SCHEME) {
            Some(rest) => Source::Hub(HubRef::parse(rest).unwrap_or_else(|_| HubRef { repo: rest.into(), revision: HubRef::DEFAULT_REVISION.into() })),
            None => {
                let p = PathBuf::from(&self.source);
                Source::Local(if p.is_absolute() { p } else { base.join(p) })
            }
        }
    }
}

const HUB_SCHEME: &str = "hf://";

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { file: path.to_path_buf(), location: None, message: format!("cannot read: {e}") })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let location = inner.location().map(|l| (l.line(), l.column()));
            let text = strip_location(&inner.to_string());
            // serde_yaml may start its message with the path already.
            let text = text.strip_prefix(&format!("{field}: ")).unwrap_or(&text).to_string();
            let message = if field == "." { text } else { format!("field `{field}`: {text}") };
            ConfigError { file: path.to_path_buf(), location, message }
        })?;
        config.validate().map_err(|(field, message)| ConfigError {
            file: path.to_path_buf(),
            location: find_line(text, &field),
            message: format!("field `{field}`: {message}"),
        })?;
        Ok(config)
    }

    /// Checks values serde cannot: returns the field path and the problem.
    fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("io_threads", self.io_threads),
            ("limits.max_items_per_request", self.limits.max_items_per_request),
            ("limits.max_message_bytes", self.limits.max_message_bytes),
            ("limits.max_concurrent_requests", self.limits.max_concurrent_requests),
            ("limits.max_text_bytes", self.limits.max_text_bytes),
            ("limits.max_stream_items_per_second", self.limits.max_stream_items_per_second.map_or(1, |r| r as usize)),
            ("limits.max_stream_pending_bytes", self.limits.max_stream_pending_bytes),
            ("batching.max_batch_tokens", self.batching.max_batch_tokens),
            ("batching.max_batch_size", self.batching.max_batch_size),
            ("batching.max_queue", self.batching.max_queue),
        ];
        if let Some((f, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err((f.to_string(), "must be greater than 0".into()));
        }
        if self.limits.max_items_per_request > self.batching.max_queue {
            return Err(("limits.max_items_per_request".into(), format!(
                "{} exceeds batching.max_queue ({}): such a request could never be queued",
                self.limits.max_items_per_request, self.batching.max_queue)));
        }
        // Deadlines are instants: past a day they buy nothing and can overflow the clock.
        const DAY: Duration = Duration::from_secs(86_400);
        for (field, d) in [("limits.stream_idle_timeout", self.limits.stream_idle_timeout), ("limits.request_timeout", self.limits.request_timeout)] {
            if d.is_zero() || d > DAY {
                return Err((field.into(), format!("{d:?} is outside 1ns to 24h")));
            }
        }
        let one_message = self.limits.max_message_bytes.saturating_add(STREAM_MESSAGE_OVERHEAD);
        if self.limits.max_stream_pending_bytes < one_message {
            return Err(("limits.max_stream_pending_bytes".into(), format!(
                "{} leaves no room for one message of limits.max_message_bytes ({} + {} bytes)",
                self.limits.max_stream_pending_bytes, self.limits.max_message_bytes, STREAM_MESSAGE_OVERHEAD)));
        }
        if self.memory.limit.is_some_and(|l| l == MemorySize::Bytes(0)) {
            return Err(("memory.limit".into(), "must be greater than 0 (null: MLX's default)".into()));
        }
        let over = match (self.memory.limit, self.memory.cache_limit) {
            (Some(MemorySize::Bytes(limit)), Some(MemorySize::Bytes(cache))) => cache > limit,
            (Some(MemorySize::Share(limit)), Some(MemorySize::Share(cache))) => cache > limit,
            _ => false, // bytes against a share: known once the device's memory is
        };
        if over {
            return Err(("memory.cache_limit".into(), "exceeds memory.limit".into()));
        }
        if self.shutdown.grace_period.is_zero() {
            return Err(("shutdown.grace_period".into(), "must be greater than 0".into()));
        }
        self.listen.parse::<std::net::SocketAddr>()
            .map_err(|e| ("listen".to_string(), format!("`{}` is not an address (host:port): {e}", self.listen)))?;
        if let Some(listen) = &self.metrics.listen {
            listen.parse::<std::net::SocketAddr>()
                .map_err(|e| ("metrics.listen".to_string(), format!("`{listen}` is not an address (host:port): {e}")))?;
        }
        if self.metrics.latency_target.is_zero() {
            return Err(("metrics.latency_target".into(), "must be greater than 0".into()));
        }
        if self.models.is_empty() {
            return Err(("models".into(), "at least one model is needed".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.trim().is_empty() || m.name.contains(char::is_whitespace) {
                return Err((format!("models[{i}].name"), format!("`{}` is not a usable name (no spaces, not empty)", m.name)));
            }
            if !seen.insert(m.name.as_str()) {
                return Err((format!("models[{i}].name"), format!("`{}` is used twice", m.name)));
            }
            if m.source.trim().is_empty() {
                return Err((format!("models[{i}].source"), "must not be empty".into()));
            }
            if let Some(reference) = m.source.strip_prefix(HUB_SCHEME) {
                HubRef::parse(reference).map_err(|e| (format!("models[{i}].source"), e))?;
            }
            if let Some(dims) = &m.allowed_dimensions {
                if dims.is_empty() || dims.contains(&0) {
                    return Err((format!("models[{i}].allowed_dimensions"), "must list sizes greater than 0".into()));
                }
            }
            if m.max_tokens == Some(0) {
                return Err((format!("models[{i}].max_tokens"), "must be greater than 0".into()));
            }
        }
        Ok(())
    }
}

/// serde_yaml appends " at line L column C"; the location is reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Best-effort line of a field path's last key (`models[1].name` → the second `name:` line under
/// `models`), for errors found after parsing.
fn find_line(text: &str, field: &str) -> Option<(usize, usize)> {
    let key = field.rsplit('.').next()?.split('[').next()?;
    let index: usize = field.split('[').nth(1).and_then(|s| s.split(']').next()).and_then(|s| s.parse().ok()).unwrap_or(0);
    let is_list_field = field.contains('[');
    let mut hits = text.lines().enumerate().filter_map(|(n, line)| {
        let t = line.trim_start().trim_start_matches("- ");
        t.starts_with(&format!("{key}:")).then(|| (n + 1, line.find(key).unwrap_or(0) + 1))
    });
    if is_list_field { hits.nth(index) } else { hits.next() }
}

/// Durations written `250ms`, `2s`, `1m` (also for command-line flags).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a duration (e.g. 250ms, 2s, 1m)")))
    }

    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, unit) = s.split_at(split);
        let v: f64 = num.parse().ok()?;
        let secs = match unit.trim() {
            "us" | "µs" => v / 1e6,
            "ms" => v / 1e3,
            "s" => v,
            "m" => v * 60.0,
            _ => return None,
        };
        Duration::try_from_secs_f64(secs).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("cfg.yaml"), text)
    }

    const MINIMAL: &str = "models:\n  - name: m\n    source: ./m\n";

    #[test]
    fn stream_limits_that_cannot_work_are_named() {
        for (limits, field) in [
            ("{stream_idle_timeout: 0s}", "limits.stream_idle_timeout"),
            ("{stream_idle_timeout: 100000000000s}", "limits.stream_idle_timeout"),
            ("{request_timeout: 100000000000s}", "limits.request_timeout"),
            ("{max_message_bytes: 1000000, max_stream_pending_bytes: 1000000}", "limits.max_stream_pending_bytes"),
        ] {
            let err = parse(&format!("limits: {limits}\n{MINIMAL}")).unwrap_err().to_string();
            assert!(err.contains(field), "{limits}: {err}");
        }
        assert!(parse(&format!("limits: {{max_message_bytes: 1000000, max_stream_pending_bytes: 1000256}}\n{MINIMAL}")).is_ok());
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, "127.0.0.1:50051");
        assert_eq!(c.io_threads, 2);
        assert_eq!(parse(&format!("io_threads: 8\n{MINIMAL}")).unwrap().io_threads, 8);
        assert_eq!(c.batching.max_wait, Duration::from_millis(2));
        assert_eq!(c.batching.idle_spin, Duration::ZERO);
        assert_eq!(parse(&format!("batching:\n  idle_spin: 2ms\n{MINIMAL}")).unwrap().batching.idle_spin, Duration::from_millis(2));
        assert_eq!(c.models[0].dtype, DtypeChoice::Auto);
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(c.metrics.latency_target, Duration::from_millis(25));
    }

    #[test]
    fn the_metrics_endpoint_can_be_turned_off_and_a_bad_address_is_refused() {
        let c = parse(&format!("metrics:\n  listen: null\n{MINIMAL}")).unwrap();
        assert_eq!(c.metrics.listen, None);
        let err = parse(&format!("metrics:\n  listen: nowhere\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("metrics.listen") && err.starts_with("cfg.yaml:2:"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_named_with_its_line() {
        let err = parse("models:\n  - name: m\n    source: ./m\n    colour: red\n").unwrap_err().to_string();
        assert!(err.starts_with("cfg.yaml:4:") && err.contains("colour") && err.contains("models[0]"), "{err}");
    }

    #[test]
    fn a_bad_value_is_named_with_its_line() {
        let err = parse("models:\n  - name: m\n    source: ./m\n    dtype: f64\n").unwrap_err().to_string();
        assert_eq!(err, "cfg.yaml:4:12: field `models[0].dtype`: unknown variant `f64`, expected one of `auto`, `f32`, `bf16`");
    }

    #[test]
    fn a_bad_duration_is_refused() {
        let err = parse(&format!("batching:\n  max_wait: soon\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("batching.max_wait") && err.contains("soon") && err.starts_with("cfg.yaml:2:"), "{err}");
    }

    #[test]
    fn a_duplicate_model_name_points_at_the_second() {
        let err = parse("models:\n  - name: m\n    source: a\n  - name: m\n    source: b\n").unwrap_err().to_string();
        assert!(err.starts_with("cfg.yaml:4:") && err.contains("models[1].name"), "{err}");
    }

    #[test]
    fn a_request_limit_larger_than_the_queue_is_refused() {
        let err = parse(&format!("limits:\n  max_items_per_request: 100\nbatching:\n  max_queue: 10\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("limits.max_items_per_request") && err.contains("max_queue"), "{err}");
    }

    #[test]
    fn zero_limits_and_bad_addresses_are_refused() {
        let err = parse(&format!("limits:\n  max_items_per_request: 0\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("limits.max_items_per_request") && err.starts_with("cfg.yaml:2:"), "{err}");
        let err = parse(&format!("listen: nowhere\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("listen") && err.starts_with("cfg.yaml:1:"), "{err}");
        let err = parse(&format!("io_threads: 0\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("io_threads") && err.contains("greater than 0"), "{err}");
    }

    #[test]
    fn sources_resolve_relative_to_the_config_and_hub_references_parse() {
        let mut m = parse(MINIMAL).unwrap().models.remove(0);
        assert_eq!(m.resolved_source(Path::new("/etc/x")), Source::Local(PathBuf::from("/etc/x/./m")));
        m.source = "hf://Qwen/Qwen3-Embedding-0.6B@v2".into();
        assert_eq!(m.resolved_source(Path::new("/")), Source::Hub(HubRef { repo: "Qwen/Qwen3-Embedding-0.6B".into(), revision: "v2".into() }));
    }

    #[test]
    fn a_malformed_hub_reference_is_refused_with_its_line() {
        let err = parse("models:\n  - name: m\n    source: hf://a/b/c\n").unwrap_err().to_string();
        assert!(err.starts_with("cfg.yaml:3:") && err.contains("models[0].source") && err.contains("a/b/c"), "{err}");
    }

    #[test]
    fn the_example_config_parses_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
        let c = Config::load(&path).unwrap();
        let d = parse(MINIMAL).unwrap();
        assert_eq!(format!("{:?}", c.limits), format!("{:?}", d.limits));
        assert_eq!(format!("{:?}", c.batching), format!("{:?}", d.batching));
        assert_eq!(c.shutdown.grace_period, d.shutdown.grace_period);
        assert!(c.tls.is_none() && !c.auth.enabled());
    }

    #[test]
    fn tls_shutdown_and_stream_limits_parse_and_zero_is_refused() {
        let c = parse(&format!("tls:\n  cert_file: s.pem\n  key_file: s.key\nshutdown:\n  grace_period: 5s\n\
            limits:\n  max_stream_items_per_second: 100\n  max_text_bytes: 10\n{MINIMAL}")).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!((tls.cert_file.to_str(), tls.client_ca_file), (Some("s.pem"), None));
        assert_eq!(c.shutdown.grace_period, Duration::from_secs(5));
        assert_eq!((c.limits.max_stream_items_per_second, c.limits.max_text_bytes), (Some(100), 10));
        let err = parse(&format!("tls:\n  cert_file: s.pem\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("key_file"), "{err}");
        for (yaml, field) in [
            ("shutdown:\n  grace_period: 0s\n", "shutdown.grace_period"),
            ("limits:\n  max_stream_items_per_second: 0\n", "limits.max_stream_items_per_second"),
            ("limits:\n  max_text_bytes: 0\n", "limits.max_text_bytes"),
        ] {
            let err = parse(&format!("{yaml}{MINIMAL}")).unwrap_err().to_string();
            assert!(err.contains(field) && err.starts_with("cfg.yaml:2:"), "{err}");
        }
    }

    #[test]
    fn durations_parse_in_common_units() {
        assert_eq!(duration::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration::parse("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(duration::parse("1m"), Some(Duration::from_secs(60)));
        assert_eq!(duration::parse("5 parsecs"), None);
        assert_eq!(duration::parse("999999999999999999999m"), None);
    }

    #[test]
    fn memory_sizes_are_bytes_or_a_share_of_the_device_and_bad_ones_are_refused() {
        let d = parse(MINIMAL).unwrap().memory;
        assert_eq!((d.limit, d.cache_limit, d.release_after_idle), (None, None, Duration::from_secs(2)));
        let c = parse(&format!("memory:\n  limit: 25%\n  cache_limit: 512MiB\n  release_after_idle: 0s\n{MINIMAL}")).unwrap().memory;
        assert_eq!((c.limit, c.cache_limit, c.release_after_idle), (Some(MemorySize::Share(0.25)), Some(MemorySize::Bytes(512 << 20)), Duration::ZERO));
        for (text, bytes) in [("1048576", 1 << 20), ("2GB", 2_000_000_000), ("1.5GiB", 3 << 29), ("0", 0), ("64 KiB", 64 << 10)] {
            let c = parse(&format!("memory:\n  cache_limit: {text}\n{MINIMAL}")).unwrap().memory;
            assert_eq!(c.cache_limit, Some(MemorySize::Bytes(bytes)), "{text}");
        }
        assert_eq!(MemorySize::Share(0.25).bytes(Some(1000)), Some(250));
        assert_eq!(MemorySize::Share(0.25).bytes(None), None);
        for (yaml, field) in [
            ("memory:\n  cache_limit: lots\n", "memory.cache_limit"),
            ("memory:\n  cache_limit: 150%\n", "memory.cache_limit"),
            ("memory:\n  limit: 0%\n", "memory.limit"),
            ("memory:\n  limit: 0\n", "memory.limit"),
            ("memory:\n  limit: 1GiB\n  cache_limit: 2GiB\n", "memory.cache_limit"),
            ("memory:\n  release_after_idle: soon\n", "memory.release_after_idle"),
            ("memory:\n  cache: 1GiB\n", "cache"),
        ] {
            let err = parse(&format!("{yaml}{MINIMAL}")).unwrap_err().to_string();
            assert!(err.contains(field) && err.starts_with("cfg.yaml:"), "{yaml}: {err}");
        }
        let example = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml")).unwrap();
        assert_eq!(example.memory, d, "config.example.yaml states the defaults");
    }
}
