//! `mlx-embed bench`: a gRPC load generator for a running server (or one it starts).
//!
//! Closed loop: `concurrency` clients each send the next request as soon as the last is answered.
//! Open loop: requests start at a fixed rate whatever the answers, and latency counts from when a
//! request was due (so a stalled server cannot hide its queueing). The `mixed` workload sends
//! every kind of call, including refused and expired ones, for soak runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use crate::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient};

/// What the requests carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Short queries (about 4–12 words, ≤ 16 tokens).
    Short,
    /// Documents of about 128–256 tokens.
    Docs,
    /// Short and document texts, 4 to 1.
    Mixed,
    /// Every kind of call: Embed (texts, with vector items), EmbedStream, Tokenize, invalid
    /// requests and calls with a 1 ms deadline. For soak runs.
    Soak,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub model: String,
    pub workload: Workload,
    /// Texts per Embed request.
    pub batch: usize,
    /// Closed loop with this many clients, or open loop at `qps`.
    pub load: Load,
    pub warmup: Duration,
    pub duration: Duration,
    pub api_key: Option<String>,
    /// Print a progress line this often (with the server's RSS when `metrics` is known).
    pub progress: Option<Duration>,
    /// The server's Prometheus endpoint (host:port), for its resident memory and stage times.
    pub metrics: Option<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    Concurrency(usize),
    Qps(f64),
}

/// The measured outcome of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub workload: Workload,
    pub load: Load,
    pub batch: usize,
    pub seconds: f64,
    /// When the measured window opened, in seconds since the Unix epoch: the server's log lines
    /// (each request's stage times at debug level) and metrics of the window can be matched to it.
    pub window_opened_unix_s: f64,
    pub requests: u64,
    pub items: u64,
    pub tokens: u64,
    pub requests_per_second: f64,
    pub items_per_second: f64,
    pub tokens_per_second: f64,
    pub latency_ms: Latency,
    /// Calls that failed, by gRPC code; `expected_errors` are the soak workload's deliberate ones
    /// (invalid requests, 1 ms deadlines) that failed as they should.
    pub errors: BTreeMap<String, u64>,
    pub expected_errors: BTreeMap<String, u64>,
    /// Open loop: requests that could not start on time because `max_outstanding` were open.
    pub late_starts: u64,
    pub server_rss_bytes: Option<RssSamples>,
    /// Mean milliseconds per Embed request in each of the server's stages (`tokenize`, `queue`,
    /// `launch`, `inference`, `serialize`) over the measured window, from its stage histograms
    /// (with `metrics`; every client of the model counts, and requests that straddle the
    /// window's edges count where the server finished them).
    pub server_stages_ms: Option<BTreeMap<String, f64>>,
    /// Padded batch shapes the server met for the first time during the measured window (with
    /// `metrics`): each one's first forward builds its kernels, a stall of 50 ms to 1 s on a GPU.
    pub server_new_shapes: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct RssSamples {
    pub start: f64,
    pub end: f64,
    pub max: f64,
    /// (seconds since the start, bytes)
    pub samples: Vec<(f64, f64)>,
}

impl Latency {
    /// Percentiles of samples in milliseconds.
    pub fn of(mut ms: Vec<f64>) -> Latency {
        if ms.is_empty() {
            return Latency::default();
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least q of the samples at or below it.
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Latency { p50: rank(0.50), p95: rank(0.95), p99: rank(0.99), max: ms[ms.len() - 1], mean: ms.iter().sum::<f64>() / ms.len() as f64 }
    }
}

/// A small deterministic generator (xorshift64*), so runs with one seed send the same texts.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// The words of the generated texts (also the vocabulary of [`crate::synthetic`] models).
pub const WORDS: &[&str] = &[
    "vector", "search", "index", "query", "document", "embedding", "model", "latency", "memory",
    "batch", "token", "server", "cluster", "shard", "replica", "storage", "engine", "result",
    "ranking", "filter", "distance", "cosine", "graph", "neighbor", "cache", "request", "stream",
    "the", "a", "of", "and", "to", "in", "for", "with", "on", "fast", "exact", "large", "small",
    "database", "throughput", "network", "recall", "precision", "update", "insert", "delete",
];

/// A text of `words` words.
pub fn text(rng: &mut Rng, words: usize) -> String {
    (0..words).map(|_| WORDS[rng.next() as usize % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

fn workload_text(rng: &mut Rng, w: Workload) -> String {
    let doc = match w {
        Workload::Short => false,
        Workload::Docs => true,
        Workload::Mixed | Workload::Soak => rng.next() % 5 == 0,
    };
    // About 1.3 tokens per word with a real tokenizer: 100–195 words ≈ 128–256 tokens.
    let words = if doc { rng.range(100, 195) } else { rng.range(4, 12) };
    text(rng, words)
}

/// One call's outcome.
enum Outcome {
    Ok { items: u64, tokens: u64 },
    Failed(tonic::Code),
    /// A deliberate bad call that failed as it should.
    Expected(tonic::Code),
}

#[derive(Default)]
struct Tally {
    ms: Vec<f64>,
    requests: u64,
    items: u64,
    tokens: u64,
    errors: BTreeMap<String, u64>,
    expected: BTreeMap<String, u64>,
    late: u64,
}

impl Tally {
    fn add(&mut self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Ok { items, tokens } => {
                self.ms.push(latency.as_secs_f64() * 1e3);
                self.requests += 1;
                self.items += items;
                self.tokens += tokens;
            }
            Outcome::Failed(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
            Outcome::Expected(code) => *self.expected.entry(format!("{code:?}")).or_default() += 1,
        }
    }
}

struct Caller {
    client: EmbeddingServiceClient<Channel>,
    options: Arc<Options>,
}

impl Caller {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        if let Some(key) = &self.options.api_key {
            if let Ok(v) = format!("Bearer {key}").parse() {
                req.metadata_mut().insert("authorization", v);
            }
        }
        req
    }

    fn embed_request(&self, rng: &mut Rng, n: usize) -> pb::EmbedRequest {
        let items = (0..n).map(|_| pb::Item { input: Some(pb::item::Input::Text(workload_text(rng, self.options.workload))) }).collect();
        pb::EmbedRequest { model: self.options.model.clone(), items, ..Default::default() }
    }

    async fn embed(&mut self, req: tonic::Request<pb::EmbedRequest>) -> Outcome {
        match self.client.embed(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Outcome::Ok { items: r.embeddings.len() as u64, tokens: r.usage.map_or(0, |u| u.total_tokens) }
            }
            Err(s) => Outcome::Failed(s.code()),
        }
    }

    /// One call of the workload.
    async fn call(&mut self, rng: &mut Rng) -> Outcome {
        let batch = self.options.batch;
        if self.options.workload != Workload::Soak {
            let req = self.request(self.embed_request(rng, batch));
            return self.embed(req).await;
        }
        match rng.next() % 20 {
            // Texts with a vector item of the model's size, taken from an answer.
            0 | 1 => {
                let first = self.embed(self.request(self.embed_request(rng, 1))).await;
                if !matches!(first, Outcome::Ok { .. }) {
                    return first;
                }
                let mut req = self.embed_request(rng, batch);
                let dims = self.dimensions().await;
                req.items.push(pb::Item { input: Some(pb::item::Input::Vector(pb::Vector { values: (0..dims).map(|i| (i % 7) as f32 - 3.0).collect() })) });
                self.embed(self.request(req)).await
            }
            2 | 3 => {
                let messages: Vec<pb::EmbedRequest> = (0..rng.range(1, 5)).map(|_| self.embed_request(rng, batch)).collect();
                let n = messages.len();
                match self.client.embed_stream(self.request(futures_util::stream::iter(messages))).await {
                    Ok(resp) => {
                        let mut answers = resp.into_inner();
                        let (mut items, mut tokens, mut got) = (0, 0, 0);
                        loop {
                            match answers.message().await {
                                Ok(Some(r)) => {
                                    items += r.embeddings.len() as u64;
                                    tokens += r.usage.map_or(0, |u| u.total_tokens);
                                    got += 1;
                                }
                                Ok(None) if got == n => return Outcome::Ok { items, tokens },
                                Ok(None) => return Outcome::Failed(tonic::Code::DataLoss),
                                Err(s) => return Outcome::Failed(s.code()),
                            }
                        }
                    }
                    Err(s) => Outcome::Failed(s.code()),
                }
            }
            4 | 5 => {
                let req = pb::TokenizeRequest { model: self.options.model.clone(), text: workload_text(rng, self.options.workload), ..Default::default() };
                match self.client.tokenize(self.request(req)).await {
                    Ok(r) => Outcome::Ok { items: 1, tokens: r.into_inner().count as u64 },
                    Err(s) => Outcome::Failed(s.code()),
                }
            }
            // An empty text: INVALID_ARGUMENT.
            6 => {
                let mut req = self.embed_request(rng, batch);
                req.items.push(pb::Item { input: Some(pb::item::Input::Text(String::new())) });
                match self.embed(self.request(req)).await {
                    Outcome::Failed(tonic::Code::InvalidArgument) => Outcome::Expected(tonic::Code::InvalidArgument),
                    other => other,
                }
            }
            // A 1 ms deadline: usually gone before the answer, its work dropped.
            7 => {
                let mut req = self.request(self.embed_request(rng, batch));
                req.set_timeout(Duration::from_millis(1));
                match self.embed(req).await {
                    Outcome::Failed(code @ (tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)) => Outcome::Expected(code),
                    other => other,
                }
            }
            _ => self.embed(self.request(self.embed_request(rng, batch))).await,
        }
    }

    async fn dimensions(&mut self) -> usize {
        let req = self.request(pb::GetModelRequest { model: self.options.model.clone() });
        self.client.get_model(req).await.map_or(0, |m| m.into_inner().dimensions as usize)
    }
}

/// Connects `connections` channels to `addr` (`host:port` or a URL).
pub async fn connect(addr: &str, connections: usize) -> anyhow::Result<Vec<EmbeddingServiceClient<Channel>>> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let channel = Channel::from_shared(url.clone())?.tcp_nodelay(true).connect().await?;
        clients.push(EmbeddingServiceClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20));
    }
    Ok(clients)
}

fn scrape(metrics: &str) -> Option<String> {
    ureq::get(&format!("http://{metrics}/metrics")).call().ok()?.body_mut().read_to_string().ok()
}

/// The value of one series (name with its labels, as exported) in an exposition text.
fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The server's resident memory from its Prometheus endpoint.
pub fn server_rss(metrics: &str) -> Option<f64> {
    series_value(&scrape(metrics)?, crate::metrics::RSS)
}

/// What the report takes from the server's metrics, read at both ends of the measured window.
struct ServerReading {
    stages: BTreeMap<String, (f64, f64)>,
    new_shapes: Option<f64>,
}

fn read_server(metrics: &str, model: &str) -> Option<ServerReading> {
    let text = scrape(metrics)?;
    Some(ServerReading {
        stages: stage_totals(&text, model),
        new_shapes: series_value(&text, &format!("{}{{model=\"{model}\"}}", crate::metrics::NEW_SHAPES)),
    })
}

/// Sum (seconds) and count of each stage of `model`'s Embed requests, from an exposition text.
pub fn stage_totals(text: &str, model: &str) -> BTreeMap<String, (f64, f64)> {
    let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let prefix = format!("{}_", crate::metrics::STAGE_DURATION);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let (is_sum, rest) = match (rest.strip_prefix("sum{"), rest.strip_prefix("count{")) {
            (Some(r), _) => (true, r),
            (_, Some(r)) => (false, r),
            _ => continue,
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let label = |name: &str| {
            let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
            labels[start..].find('"').map(|end| &labels[start..start + end])
        };
        if label("model") != Some(model) {
            continue;
        }
        let Some(stage) = label("stage") else { continue };
        let entry = totals.entry(stage.to_string()).or_default();
        if is_sum { entry.0 = value } else { entry.1 = value }
    }
    totals
}

/// Mean milliseconds per request in each stage between two readings of [`stage_totals`].
pub fn stage_means(before: &BTreeMap<String, (f64, f64)>, after: &BTreeMap<String, (f64, f64)>) -> BTreeMap<String, f64> {
    after.iter().filter_map(|(stage, &(sum, count))| {
        let (sum0, count0) = before.get(stage).copied().unwrap_or_default();
        (count > count0).then(|| (stage.clone(), (sum - sum0) / (count - count0) * 1e3))
    }).collect()
}

/// Runs the load: warm-up (not counted), then `duration` measured.
pub async fn run(clients: Vec<EmbeddingServiceClient<Channel>>, options: Options) -> Report {
    let options = Arc::new(options);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let measure_from = started + options.warmup;
    let window_opened = std::time::SystemTime::now() + options.warmup;
    let end = measure_from + options.duration;
    let rss: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    // The server's stage totals and shape count as the measured window opens.
    let server_before = options.metrics.clone().map(|m| {
        let model = options.model.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            tokio::task::spawn_blocking(move || read_server(&m, &model)).await.ok().flatten()
        })
    });

    // Progress and RSS samples.
    let sampler = {
        let (options, tally, rss) = (Arc::clone(&options), Arc::clone(&tally), Arc::clone(&rss));
        tokio::spawn(async move {
            let every = options.progress.unwrap_or(Duration::from_secs(10));
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let t = now.saturating_duration_since(measure_from).as_secs_f64();
                let bytes = match options.metrics.clone() {
                    Some(m) => tokio::task::spawn_blocking(move || server_rss(&m)).await.ok().flatten(),
                    None => None,
                };
                if let Some(b) = bytes {
                    if now >= measure_from {
                        rss.lock().unwrap().push((t, b));
                    }
                }
                if options.progress.is_some() && now >= measure_from {
                    let tl = tally.lock().unwrap();
                    let errors: u64 = tl.errors.values().sum();
                    eprintln!("[{t:>6.0}s] {} ok, {errors} errors{}", tl.requests,
                        bytes.map(|b| format!(", server RSS {:.1} MiB", b / 1048576.0)).unwrap_or_default());
                }
                if now >= end {
                    break;
                }
            }
        })
    };

    match options.load {
        Load::Concurrency(n) => {
            let workers: Vec<_> = (0..n).map(|w| {
                let mut caller = Caller { client: clients[w % clients.len()].clone(), options: Arc::clone(&options) };
                let tally = Arc::clone(&tally);
                let mut rng = Rng::new(options.seed.wrapping_add(w as u64 + 1));
                tokio::spawn(async move {
                    while Instant::now() < end {
                        let t0 = Instant::now();
                        let outcome = caller.call(&mut rng).await;
                        if t0 >= measure_from {
                            tally.lock().unwrap().add(outcome, t0.elapsed());
                        }
                    }
                })
            }).collect();
            for w in workers {
                let _ = w.await;
            }
        }
        Load::Qps(qps) => {
            let interval = Duration::from_secs_f64(1.0 / qps.max(1e-3));
            let max_outstanding = Arc::new(tokio::sync::Semaphore::new(10_000));
            let mut rng = Rng::new(options.seed);
            let mut due = Instant::now();
            let mut k = 0usize;
            let mut tasks = tokio::task::JoinSet::new();
            while due < end {
                tokio::time::sleep_until(due.into()).await;
                let Ok(permit) = Arc::clone(&max_outstanding).try_acquire_owned() else {
                    if due >= measure_from {
                        tally.lock().unwrap().late += 1;
                    }
                    due += interval;
                    continue;
                };
                let mut caller = Caller { client: clients[k % clients.len()].clone(), options: Arc::clone(&options) };
                k += 1;
                let (tally, mut rng) = (Arc::clone(&tally), Rng::new(rng.next()));
                let scheduled = due;
                tasks.spawn(async move {
                    let outcome = caller.call(&mut rng).await;
                    if scheduled >= measure_from {
                        tally.lock().unwrap().add(outcome, scheduled.elapsed());
                    }
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
                due += interval;
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let seconds = Instant::now().saturating_duration_since(measure_from).as_secs_f64().max(1e-9);
    sampler.abort();
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let mut samples = std::mem::take(&mut *rss.lock().unwrap());
    if let Some(m) = options.metrics.clone() {
        if let Some(b) = tokio::task::spawn_blocking(move || server_rss(&m)).await.ok().flatten() {
            samples.push((seconds, b));
        }
    }
    let readings = match (server_before, options.metrics.clone()) {
        (Some(before), Some(m)) => {
            let model = options.model.clone();
            let after = tokio::task::spawn_blocking(move || read_server(&m, &model)).await.ok().flatten();
            before.await.ok().flatten().zip(after)
        }
        _ => None,
    };
    let server_stages_ms = readings.as_ref().map(|(b, a)| stage_means(&b.stages, &a.stages));
    let server_new_shapes = readings.as_ref()
        .and_then(|(b, a)| Some((a.new_shapes? - b.new_shapes?).max(0.0) as u64));
    let server_rss_bytes = (!samples.is_empty()).then(|| RssSamples {
        start: samples[0].1,
        end: samples[samples.len() - 1].1,
        max: samples.iter().map(|s| s.1).fold(0.0, f64::max),
        samples,
    });
    Report {
        model: options.model.clone(),
        workload: options.workload,
        load: options.load,
        batch: options.batch,
        seconds,
        window_opened_unix_s: window_opened.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        requests: tally.requests,
        items: tally.items,
        tokens: tally.tokens,
        requests_per_second: tally.requests as f64 / seconds,
        items_per_second: tally.items as f64 / seconds,
        tokens_per_second: tally.tokens as f64 / seconds,
        latency_ms: Latency::of(tally.ms),
        errors: tally.errors,
        expected_errors: tally.expected,
        late_starts: tally.late,
        server_rss_bytes,
        server_stages_ms,
        server_new_shapes,
    }
}

impl Report {
    /// The report as a table for a terminal.
    pub fn table(&self) -> String {
        let load = match self.load {
            Load::Concurrency(n) => format!("closed loop, {n} clients"),
            Load::Qps(q) => format!("open loop, {q} requests/s"),
        };
        let l = &self.latency_ms;
        let mut out = format!(
            "model {} · {:?} texts · {} per request · {load} · {:.1} s measured\n\
             {:<12} {:>12} {:>12} {:>14}\n{:<12} {:>12} {:>12} {:>14}\n{:<12} {:>12.1} {:>12.1} {:>14.0}\n\n\
             latency ms   p50 {:.2}   p95 {:.2}   p99 {:.2}   max {:.2}   mean {:.2}\n",
            self.model, self.workload, self.batch, self.seconds,
            "", "requests", "items", "tokens",
            "total", self.requests, self.items, self.tokens,
            "per second", self.requests_per_second, self.items_per_second, self.tokens_per_second,
            l.p50, l.p95, l.p99, l.max, l.mean,
        );
        let errors: u64 = self.errors.values().sum();
        out += &format!("errors       {errors}{}\n", if errors > 0 { format!(" {:?}", self.errors) } else { String::new() });
        if !self.expected_errors.is_empty() {
            out += &format!("deliberate   {:?} (invalid requests, 1 ms deadlines)\n", self.expected_errors);
        }
        if self.late_starts > 0 {
            out += &format!("late starts  {} (open loop fell behind)\n", self.late_starts);
        }
        if let Some(r) = &self.server_rss_bytes {
            out += &format!("server RSS   start {:.1} MiB, end {:.1} MiB, max {:.1} MiB ({} samples)\n",
                r.start / 1048576.0, r.end / 1048576.0, r.max / 1048576.0, r.samples.len());
        }
        if let Some(stages) = self.server_stages_ms.as_ref().filter(|s| !s.is_empty()) {
            let parts: Vec<String> = crate::metrics::STAGES.iter()
                .filter_map(|st| stages.get(*st).map(|ms| format!("{st} {ms:.2}")))
                .collect();
            out += &format!("server stages, mean ms per request: {}\n", parts.join(" · "));
        }
        if let Some(n) = self.server_new_shapes {
            out += &format!("server: {n} batch shapes met for the first time in the window\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
        assert!((l.mean - 50.5).abs() < 1e-9);
        let one = Latency::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn stage_means_come_from_the_histograms_of_the_model_over_the_window() {
        let text = |queue_sum: f64, queue_count: u64, other: f64| format!(
            "# TYPE mlx_embed_stage_duration_seconds histogram\n\
             mlx_embed_stage_duration_seconds_bucket{{model=\"q\",stage=\"queue\",le=\"0.025\"}} {queue_count}\n\
             mlx_embed_stage_duration_seconds_sum{{model=\"q\",stage=\"queue\"}} {queue_sum}\n\
             mlx_embed_stage_duration_seconds_count{{model=\"q\",stage=\"queue\"}} {queue_count}\n\
             mlx_embed_stage_duration_seconds_sum{{model=\"q\",stage=\"launch\"}} 0.5\n\
             mlx_embed_stage_duration_seconds_count{{model=\"q\",stage=\"launch\"}} 10\n\
             mlx_embed_stage_duration_seconds_sum{{model=\"q2\",stage=\"queue\"}} {other}\n\
             mlx_embed_stage_duration_seconds_count{{model=\"q2\",stage=\"queue\"}} 7\n");
        let before = stage_totals(&text(1.0, 10, 3.0), "q");
        assert_eq!(before["queue"], (1.0, 10.0));
        let after = stage_totals(&text(1.3, 13, 9.0), "q");
        let means = stage_means(&before, &after);
        // 0.3 s over 3 requests; the other model and a stage with no new requests are left out.
        assert!((means["queue"] - 100.0).abs() < 1e-9, "{means:?}");
        assert_eq!(means.len(), 1, "{means:?}");
    }

    #[test]
    fn texts_are_deterministic_per_seed_and_sized_by_workload() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        assert_eq!(workload_text(&mut a, Workload::Docs), workload_text(&mut b, Workload::Docs));
        let mut r = Rng::new(9);
        for _ in 0..200 {
            let short = workload_text(&mut r, Workload::Short).split(' ').count();
            assert!((4..=12).contains(&short));
            let doc = workload_text(&mut r, Workload::Docs).split(' ').count();
            assert!((100..=195).contains(&doc));
        }
    }
}
