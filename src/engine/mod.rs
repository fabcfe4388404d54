//! The engine: one thread owns every model and all MLX state (MLX is not thread-safe).
//!
//! [`EngineHandle`] is the cloneable, `Send` side: it submits tokenized texts for a model and
//! awaits their vectors. The thread loads the models whose folders it has, then loops: take new
//! work (and the folders of models downloaded meanwhile, loaded between batches), drop work whose
//! caller has gone, pick the next model in turn that has a batch ready (`batcher`) and start it.
//! The batch started before is collected first when the device is about done with it, else only
//! after the new one is started, so that the next batch is built while the device computes a
//! long one. Each request is answered once all its texts are done. A failing
//! batch (an MLX error or a panic) fails only the requests in it; the engine goes on. A model whose
//! batches fail [`RETIRE_AFTER`] times in a row is taken out of service ([`ModelStatus::Failed`],
//! NOT_SERVING) while the others serve. Once it has had no work for `memory.release_after_idle`,
//! it hands the memory MLX and the allocator keep for reuse back to the system (`memory`).

pub mod batcher;
mod memory;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::config::MemoryConfig;
use crate::models::{EmbeddingModel, Launched, LoadOptions, Preprocessor};
use batcher::{Limits, Next, Queue, Seq};
use memory::Memory;

/// Failed batches in a row after which a model is taken out of service.
pub const RETIRE_AFTER: u32 = 3;

/// A fault to inject into a model's next batch ([`EngineHandle::inject_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The forward pass returns an error.
    Error,
    /// The forward pass panics.
    Panic,
    /// Launching the forward pass takes this much longer (host work before the device starts).
    Delay(Duration),
    /// Launching takes this much longer, then collecting the batch fails (as an error the device
    /// reports late would).
    DelayThenFail(Duration),
}

/// A model's state, as clients and health checks see it.
#[derive(Clone)]
pub enum ModelStatus {
    /// Its files are being fetched; the note says why the last attempt failed, if one did.
    Downloading(Option<String>),
    Loading,
    Ready(Arc<Preprocessor>),
    Failed(String),
}

/// Where a model's files are.
pub enum ModelFiles {
    Folder(PathBuf),
    /// Given later through [`EngineHandle::provide`] (e.g. once downloaded).
    Later,
    /// The model cannot be loaded, and why.
    Refused(String),
}

/// What the engine should load under a name.
pub struct LoadSpec {
    pub name: String,
    pub files: ModelFiles,
    pub options: LoadOptions,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("model `{0}` is not ready")]
    NotReady(String),
    #[error("model `{model}` has {queued} texts waiting (limit {limit})")]
    Overloaded { model: String, queued: usize, limit: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("inference failed: {0}")]
    Failed(String),
}

/// Counters of the engine's work.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub sequences: AtomicU64,
    pub max_batch_size: AtomicU64,
    /// Texts dropped before inference because their caller had gone.
    pub abandoned: AtomicU64,
    pub failed_batches: AtomicU64,
    /// MLX's `active` and `cache` bytes, as last recorded (after each batch and release).
    pub mlx_active: AtomicU64,
    pub mlx_cache: AtomicU64,
    /// MLX's memory limit and cache limit as they stand after the start (`u64::MAX`: unknown).
    pub mlx_memory_limit: AtomicU64,
    pub mlx_cache_limit: AtomicU64,
    /// Times memory was handed back after an idle period.
    pub memory_releases: AtomicU64,
}

struct Slot {
    name: String,
    status: watch::Sender<ModelStatus>,
    /// Texts queued for this model (not yet started).
    queued: AtomicUsize,
    /// `queued`, exported.
    queue_depth: metrics::Gauge,
}

impl Slot {
    /// Changes `queued` by `delta` texts; returns the count before. (The gauge moves by the same
    /// delta: increments commute, so concurrent changes cannot leave it at a stale value.)
    fn add_queued(&self, delta: isize) -> usize {
        self.queue_depth.increment(delta as f64);
        if delta >= 0 {
            self.queued.fetch_add(delta as usize, Ordering::SeqCst)
        } else {
            self.queued.fetch_sub(delta.unsigned_abs(), Ordering::SeqCst)
        }
    }
}

/// A request's vectors, with where its time went.
#[derive(Debug)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// From submission until the engine starts building the batch of its first text (waiting
    /// in the queue and for the batch to fill).
    pub queue: Duration,
    /// From then until the device turns to that batch: building the batch's graph and handing
    /// it to the device (and, under load, the batch before it finishing). On the CPU, MLX
    /// computes most of a batch as it is handed over.
    pub launch: Duration,
    /// From then to its last text's vector.
    pub inference: Duration,
}

/// What the handle sends to the engine thread.
enum Msg {
    Job(Job),
    /// The files of a model that was waiting for them.
    Load { model: usize, dir: PathBuf },
    /// Finish the queued work, then stop.
    Stop,
    /// Fail the queued work, finish the batch running, then stop.
    Abort,
    Fault { model: usize, fault: Fault },
}

struct Job {
    model: usize,
    seqs: Vec<Vec<u32>>,
    submitted: Instant,
    reply: oneshot::Sender<Result<Embedded, EngineError>>,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Msg>,
    slots: Arc<Vec<Slot>>,
    stats: Arc<Stats>,
    max_queue: usize,
    /// The engine thread, joined by [`EngineHandle::shutdown`].
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the engine thread with the default memory settings; it loads `specs` in order,
    /// then serves.
    pub fn start(specs: Vec<LoadSpec>, limits: Limits, max_queue: usize) -> EngineHandle {
        EngineHandle::start_with_memory(specs, limits, max_queue, MemoryConfig::default())
    }

    /// [`EngineHandle::start`], with MLX's memory limits and the release of idle memory set
    /// from `memory`.
    pub fn start_with_memory(specs: Vec<LoadSpec>, limits: Limits, max_queue: usize, memory: MemoryConfig) -> EngineHandle {
        let slots: Arc<Vec<Slot>> = Arc::new(
            specs.iter().map(|s| Slot {
                name: s.name.clone(),
                status: watch::channel(match s.files {
                    ModelFiles::Later => ModelStatus::Downloading(None),
                    _ => ModelStatus::Loading,
                }).0,
                queued: AtomicUsize::new(0),
                queue_depth: metrics::gauge!(crate::metrics::QUEUE_DEPTH, "model" => s.name.clone()),
            }).collect(),
        );
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel();
        let (s, st) = (Arc::clone(&slots), Arc::clone(&stats));
        let thread = std::thread::Builder::new()
            .name("mlx-engine".into())
            .spawn(move || {
                let options = specs.iter().map(|s| s.options).collect();
                Engine::new(s, st, limits, options, &memory).run(specs, rx)
            })
            .expect("spawning the engine thread");
        EngineHandle { tx, slots, stats, max_queue, thread: Arc::new(std::sync::Mutex::new(Some(thread))) }
    }

    /// Lets the engine finish the work already queued, then stops its thread and waits for it.
    /// MLX must be idle before the process exits (its teardown aborts under a running thread).
    /// Later `embed` calls get [`EngineError::Stopped`].
    pub fn shutdown(&self) {
        self.stop(Msg::Stop);
    }

    /// Like [`EngineHandle::shutdown`], but queued work fails ([`EngineError::Stopped`]); only the
    /// batch already on the device is finished. For when the grace period of a shutdown is over.
    pub fn abort(&self) {
        self.stop(Msg::Abort);
    }

    fn stop(&self, msg: Msg) {
        let _ = self.tx.send(msg);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Hands the engine the folder of a model created with [`ModelFiles::Later`]; it loads it
    /// between batches. Fails once the engine has stopped.
    pub fn provide(&self, model: usize, dir: PathBuf) -> Result<(), EngineError> {
        self.tx.send(Msg::Load { model, dir }).map_err(|_| EngineError::Stopped)
    }

    /// Notes why fetching a waiting model's files failed (it stays [`ModelStatus::Downloading`]).
    pub fn note_download(&self, model: usize, note: Option<String>) {
        self.slots[model].status.send_if_modified(|s| match s {
            ModelStatus::Downloading(n) => {
                *n = note;
                true
            }
            _ => false,
        });
    }

    /// Injects `fault` into `model`'s next batch: it fails as an MLX error or a crash inside a
    /// forward pass would, or its launch takes longer. For tests (fault isolation, batch order).
    #[doc(hidden)]
    pub fn inject_fault(&self, model: usize, fault: Fault) {
        let _ = self.tx.send(Msg::Fault { model, fault });
    }

    /// Texts queued for `model` that no batch has taken yet.
    pub fn queued(&self, model: usize) -> usize {
        self.slots[model].queued.load(Ordering::SeqCst)
    }

    /// Whether the engine thread has ended (after [`EngineHandle::shutdown`]).
    pub fn is_stopped(&self) -> bool {
        self.thread.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_none_or(|t| t.is_finished())
    }

    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.name == name)
    }

    pub fn status(&self, model: usize) -> ModelStatus {
        self.slots[model].status.borrow().clone()
    }

    pub fn subscribe(&self, model: usize) -> watch::Receiver<ModelStatus> {
        self.slots[model].status.subscribe()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Embeds token sequences with `model`; returns the head's output per sequence, in order.
    pub async fn embed(&self, model: usize, seqs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self.embed_timed(model, seqs).await?.vectors)
    }

    /// [`EngineHandle::embed`], with where the time went (queued, launching, in inference).
    pub async fn embed_timed(&self, model: usize, seqs: Vec<Vec<u32>>) -> Result<Embedded, EngineError> {
        if seqs.is_empty() {
            return Ok(Embedded { vectors: vec![], queue: Duration::ZERO, launch: Duration::ZERO, inference: Duration::ZERO });
        }
        let slot = &self.slots[model];
        if !matches!(*slot.status.borrow(), ModelStatus::Ready(_)) {
            return Err(EngineError::NotReady(slot.name.clone()));
        }
        let n = seqs.len();
        let before = slot.add_queued(n as isize);
        if before + n > self.max_queue {
            slot.add_queued(-(n as isize));
            metrics::counter!(crate::metrics::REFUSED, "reason" => "overloaded").increment(1);
            return Err(EngineError::Overloaded { model: slot.name.clone(), queued: before, limit: self.max_queue });
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Job(Job { model, seqs, submitted: Instant::now(), reply })).is_err() {
            slot.add_queued(-(n as isize));
            return Err(EngineError::Stopped);
        }
        rx.await.unwrap_or(Err(EngineError::Stopped))
    }
}

struct Pending {
    out: Vec<Option<Vec<f32>>>,
    remaining: usize,
    reply: oneshot::Sender<Result<Embedded, EngineError>>,
    /// When the request was handed to the engine.
    accepted: Instant,
    /// When the engine began building the batch of its first text.
    launched: Option<Instant>,
    /// When its first text's forward pass started.
    started: Option<Instant>,
}

/// State owned by the engine thread.
struct Engine {
    slots: Arc<Vec<Slot>>,
    stats: Arc<Stats>,
    limits: Limits,
    models: Vec<Option<EmbeddingModel>>,
    /// How each model is to be loaded (for models whose files come later).
    options: Vec<LoadOptions>,
    queues: Vec<Queue>,
    jobs: HashMap<u64, Pending>,
    next_job: u64,
    /// Where the round-robin over models resumes.
    turn: usize,
    /// The batch started last, not yet collected.
    in_flight: Option<InFlight>,
    /// The `device` label of MLX's memory counters.
    device: &'static str,
    memory: Memory,
    /// Per model: a fault to inject into its next batch.
    faults: Vec<Option<Fault>>,
    /// Per model: batches failed since its last success.
    failures: Vec<u32>,
}

struct InFlight {
    model: usize,
    batch: Vec<Seq>,
    launched: Launched,
    /// An injected fault to report when it is collected.
    fails: bool,
}

/// Runs a loaded model on small batches before it is reported ready: its weights are read
/// from the files (MLX maps them lazily) and moved to the device, and the kernels MLX's GPU
/// backends compile at first use exist, so the first calls do not pay for that (a first forward
/// on a fresh GPU took seconds). The load time includes it.
fn warm_up(model: EmbeddingModel) -> crate::error::Result<EmbeddingModel> {
    let text = "warm up the model with a short text of several words ".repeat(8);
    let longest = model.info().max_tokens.clamp(2, 64);
    let ids = model.preprocessor().tokenize("", &text, Some(longest), crate::tokenize::Truncation::Right)?.ids;
    let cut = |n: usize| &ids[..n.min(ids.len())];
    model.embed_ids(&[cut(8)])?;
    model.embed_ids(&[cut(64), cut(40), cut(17), cut(64)])?;
    if model.info().gpu {
        // Batches of short queries run at these shapes (rows 1…64, 16 tokens): each shape's
        // first forward is slow on a GPU, so they are paid for here, not by the first clients.
        for rows in [1, 2, 4, 8, 16, 32, 64] {
            model.embed_ids(&vec![cut(16); rows])?;
        }
    }
    Ok(model)
}

impl Engine {
    fn new(slots: Arc<Vec<Slot>>, stats: Arc<Stats>, limits: Limits, options: Vec<LoadOptions>, memory: &MemoryConfig) -> Engine {
        let n = slots.len();
        let device = if crate::mlx::gpu_is_available() { "gpu" } else { "cpu" };
        let memory = Memory::start(memory, device, &stats);
        Engine {
            slots,
            stats,
            limits,
            models: (0..n).map(|_| None).collect(),
            options,
            queues: (0..n).map(|_| Queue::default()).collect(),
            jobs: HashMap::new(),
            next_job: 0,
            turn: 0,
            in_flight: None,
            device,
            memory,
            faults: vec![None; n],
            failures: vec![0; n],
        }
    }

    fn run(mut self, specs: Vec<LoadSpec>, rx: mpsc::Receiver<Msg>) {
        self.record_memory();
        for slot in self.slots.iter() {
            metrics::gauge!(crate::metrics::MODEL_LOAD, "model" => slot.name.clone()).set(f64::NAN); // not loaded yet
        }
        // Models become Ready together, once the loop that serves them can start: a model marked
        // Ready while another still loads would accept requests that cannot run yet.
        let mut ready = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let dir = match spec.files {
                ModelFiles::Folder(dir) => Ok(dir),
                ModelFiles::Later => continue,
                ModelFiles::Refused(why) => Err(why),
            };
            if let Some(status) = self.load(i, &spec.name, dir, spec.options) {
                ready.push((i, status));
            }
        }
        for (i, status) in ready {
            self.slots[i].status.send_replace(status);
        }
        let mut wait: Option<Duration> = None;
        let mut open = true;
        loop {
            // 1. Take new work: block when idle (until memory is due back, if it is), else until
            //    the earliest batch deadline.
            let received = match (open, wait) {
                (false, _) => Err(mpsc::RecvTimeoutError::Timeout),
                (true, None) => recv_after_spinning(&rx, self.limits.idle_spin, self.memory.release_due()),
                (true, Some(d)) => rx.recv_timeout(d),
            };
            let first = match received {
                Ok(msg) => Some(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if open && wait.is_none() {
                        self.memory.release(&self.stats);
                    }
                    None
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    open = false; // every handle is gone
                    None
                }
            };
            for msg in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match msg {
                    Msg::Job(job) => self.accept(job),
                    Msg::Load { model, dir } => self.load_later(model, dir),
                    Msg::Stop => open = false,
                    Msg::Abort => {
                        open = false;
                        for m in 0..self.queues.len() {
                            self.fail_queued_for(m, EngineError::Stopped);
                        }
                    }
                    Msg::Fault { model, fault } => self.faults[model] = Some(fault),
                }
            }
            // 2. Drop texts of callers that have gone.
            self.drop_abandoned();
            // 3. Run the next model's batch in turn; remember the earliest wait.
            let limits = if open { self.limits } else { Limits { max_wait: Duration::ZERO, ..self.limits } };
            wait = self.step(limits);
            if !open && self.in_flight.is_none() && self.queues.iter().all(Queue::is_empty) {
                return;
            }
        }
    }

    /// Loads a model whose files came after the start, if it still waits for them.
    fn load_later(&mut self, i: usize, dir: PathBuf) {
        if self.models[i].is_some() || !matches!(*self.slots[i].status.borrow(), ModelStatus::Downloading(_)) {
            return;
        }
        self.slots[i].status.send_replace(ModelStatus::Loading);
        let (name, options) = (self.slots[i].name.clone(), self.options[i]);
        if let Some(status) = self.load(i, &name, Ok(dir), options) {
            self.slots[i].status.send_replace(status);
        }
    }

    /// Loads one model; a failure is published at once, success is returned to publish later.
    fn load(&mut self, i: usize, name: &str, dir: Result<PathBuf, String>, options: LoadOptions) -> Option<ModelStatus> {
        let started = Instant::now();
        let loaded = match dir {
            Err(why) => Err(why),
            Ok(dir) => match catch_unwind(AssertUnwindSafe(|| EmbeddingModel::load(&dir, options).and_then(warm_up))) {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("loading panicked".to_string()),
            },
        };
        match loaded {
            Ok(model) => {
                let secs = started.elapsed().as_secs_f64();
                // Where the fused CUDA kernels' images are kept: "memory" means every start
                // compiles them again (MLX's kernel cache folder cannot be written).
                let cuda_kernels = if model.info().gpu { crate::mlx::cuda_kernel_cache() } else { "unused".to_string() };
                tracing::info!(model = %name, secs, cuda_kernels, "model loaded");
                metrics::gauge!(crate::metrics::MODEL_LOAD, "model" => name.to_string()).set(secs);
                self.record_memory();
                self.memory.loaded(name);
                let pre = model.preprocessor();
                self.models[i] = Some(model);
                Some(ModelStatus::Ready(pre))
            }
            Err(why) => {
                tracing::error!(model = %name, error = %why, "model failed to load");
                self.slots[i].status.send_replace(ModelStatus::Failed(why));
                None
            }
        }
    }

    fn accept(&mut self, job: Job) {
        let id = self.next_job;
        self.next_job += 1;
        let now = Instant::now();
        let n = job.seqs.len();
        for (index, ids) in job.seqs.into_iter().enumerate() {
            self.queues[job.model].push(Seq { job: id, index, ids, enqueued: now });
        }
        self.jobs.insert(id, Pending { out: vec![None; n], remaining: n, reply: job.reply, accepted: job.submitted, launched: None, started: None });
    }

    fn drop_abandoned(&mut self) {
        self.jobs.retain(|_, p| !p.reply.is_closed());
        for (m, q) in self.queues.iter_mut().enumerate() {
            let jobs = &self.jobs;
            let dropped = q.retain(|s| jobs.contains_key(&s.job));
            if dropped > 0 {
                self.slots[m].add_queued(-(dropped as isize));
                self.stats.abandoned.fetch_add(dropped as u64, Ordering::Relaxed);
                metrics::counter!(crate::metrics::ABANDONED, "model" => self.slots[m].name.clone()).increment(dropped as u64);
            }
        }
    }

    /// Starts at most one batch and collects the one before; returns how long to wait before
    /// the next look (`None`: idle).
    fn step(&mut self, limits: Limits) -> Option<Duration> {
        let n = self.queues.len();
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        for k in 0..n {
            let m = (self.turn + k) % n;
            match self.queues[m].next(now, limits) {
                Next::Run(batch) => {
                    self.turn = m + 1;
                    let mut previous = self.in_flight.take();
                    // A batch the device is about done with is answered before the next launch
                    // (milliseconds of host time); a long one overlaps it.
                    if let Some(p) = previous.take_if(|p| !p.launched.overlaps()) {
                        self.collect(p);
                    }
                    self.launch(m, batch);
                    if let Some(p) = previous {
                        self.collect(p);
                    }
                    // The device turns to the new batch once the previous one is done.
                    self.mark_started();
                    return Some(Duration::ZERO);
                }
                Next::WaitUntil(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                Next::Idle => {}
            }
        }
        if let Some(p) = self.in_flight.take() {
            self.collect(p);
            return Some(Duration::ZERO);
        }
        earliest.map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn launch(&mut self, m: usize, batch: Vec<Seq>) {
        note_first(&mut self.jobs, &batch, |p| &mut p.launched);
        self.slots[m].add_queued(-(batch.len() as isize));
        record_batch(&self.slots[m].name, &batch);
        let Some(model) = &self.models[m] else {
            // Taken out of service (by the batch collected just before this one was built).
            let error = EngineError::NotReady(self.slots[m].name.clone());
            self.answer_err(batch.iter().map(|s| s.job), &error);
            return;
        };
        let fault = self.faults[m].take();
        let refs: Vec<&[u32]> = batch.iter().map(|s| s.ids.as_slice()).collect();
        let shapes_before = model.shapes_seen();
        let launched = match catch_unwind(AssertUnwindSafe(|| match fault {
            Some(Fault::Panic) => panic!("injected fault"),
            Some(Fault::Error) => Err(crate::error::Error::Internal("injected fault".into())),
            Some(Fault::Delay(d) | Fault::DelayThenFail(d)) => {
                std::thread::sleep(d);
                model.launch(&refs)
            }
            None => model.launch(&refs),
        })) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("inference panicked".to_string()),
        };
        let new_shapes = model.shapes_seen().saturating_sub(shapes_before);
        if new_shapes > 0 {
            metrics::counter!(crate::metrics::NEW_SHAPES, "model" => self.slots[m].name.clone()).increment(new_shapes as u64);
        }
        match launched {
            Ok(launched) => {
                let (build, submit) = launched.host_times();
                let (padded_rows, padded_len) = launched.padded_shape();
                tracing::debug!(model = %self.slots[m].name, rows = batch.len(), padded_rows, padded_len,
                    build_ms = build.as_secs_f64() * 1e3, submit_ms = submit.as_secs_f64() * 1e3, "batch launched");
                let fails = matches!(fault, Some(Fault::DelayThenFail(_)));
                self.in_flight = Some(InFlight { model: m, batch, launched, fails })
            }
            Err(why) => self.fail(m, &batch, why),
        }
    }

    fn collect(&mut self, f: InFlight) {
        let InFlight { model: m, batch, launched, fails } = f;
        let started = Instant::now();
        let result = match catch_unwind(AssertUnwindSafe(|| launched.collect())) {
            Ok(_) if fails => Err("injected fault".to_string()),
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("inference panicked".to_string()),
        };
        match result {
            Ok(vectors) if vectors.len() != batch.len() => {
                self.fail(m, &batch, format!("{} vectors for {} texts", vectors.len(), batch.len()))
            }
            Ok(vectors) => {
                // Waiting for the device, then copying the vectors out.
                tracing::debug!(model = %self.slots[m].name, rows = batch.len(),
                    collect_ms = started.elapsed().as_secs_f64() * 1e3, "batch collected");
                self.failures[m] = 0;
                self.count(&batch);
                self.record_memory();
                for (s, v) in batch.into_iter().zip(vectors) {
                    self.deliver(s, v);
                }
            }
            Err(why) => self.fail(m, &batch, why),
        }
    }

    fn count(&self, batch: &[Seq]) {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.sequences.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.max_batch_size.fetch_max(batch.len() as u64, Ordering::Relaxed);
    }

    /// Fails every request with a text in `batch`; its other texts are dropped from the queue on
    /// the next pass (their job is gone).
    fn fail(&mut self, m: usize, batch: &[Seq], why: String) {
        self.count(batch);
        self.memory.used();
        self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::FAILED_BATCHES, "model" => self.slots[m].name.clone()).increment(1);
        tracing::error!(model = %self.slots[m].name, error = %why, size = batch.len(), "batch failed");
        // Out of service first, so a caller that sees its failure also sees the model's status.
        self.failures[m] += 1;
        if self.failures[m] >= RETIRE_AFTER && self.models[m].is_some() {
            let name = self.slots[m].name.clone();
            let note = format!("taken out of service after {} failed batches in a row; the last: {why}", self.failures[m]);
            tracing::error!(model = %name, "{note}");
            self.models[m] = None;
            self.slots[m].status.send_replace(ModelStatus::Failed(note));
            self.fail_queued_for(m, EngineError::NotReady(name));
        }
        self.answer_err(batch.iter().map(|s| s.job), &EngineError::Failed(why));
    }

    /// Answers each of `jobs` still pending with `error`; their other texts are dropped from the
    /// queues on the next pass (their job is gone).
    fn answer_err(&mut self, jobs: impl IntoIterator<Item = u64>, error: &EngineError) {
        for id in jobs {
            if let Some(p) = self.jobs.remove(&id) {
                let _ = p.reply.send(Err(error.clone()));
            }
        }
    }

    /// Fails every request with a text queued for model `m` (texts already on the device finish).
    fn fail_queued_for(&mut self, m: usize, error: EngineError) {
        let mut failed = std::collections::HashSet::new();
        let dropped = self.queues[m].retain(|s| {
            failed.insert(s.job);
            false
        });
        self.slots[m].add_queued(-(dropped as isize));
        self.answer_err(failed, &error);
    }

    /// Notes, for the requests of the batch in flight, when their first forward pass began.
    fn mark_started(&mut self) {
        let Some(f) = &self.in_flight else { return };
        note_first(&mut self.jobs, &f.batch, |p| &mut p.started);
    }

    /// Records MLX's memory counters after MLX ran; memory is then owed back once idle.
    fn record_memory(&mut self) {
        memory::record(self.device, &self.stats);
        self.memory.used();
    }

    fn deliver(&mut self, s: Seq, v: Vec<f32>) {
        let Some(p) = self.jobs.get_mut(&s.job) else { return };
        p.out[s.index] = Some(v);
        p.remaining -= 1;
        if p.remaining == 0 {
            let p = self.jobs.remove(&s.job).expect("present: just looked up");
            let vectors = p.out.into_iter().map(|v| v.expect("every index delivered once")).collect();
            let now = Instant::now();
            let started = p.started.unwrap_or(now);
            let launched = p.launched.unwrap_or(started).min(started);
            let _ = p.reply.send(Ok(Embedded {
                vectors,
                queue: launched.saturating_duration_since(p.accepted),
                launch: started - launched,
                inference: now - started,
            }));
        }
    }
}

/// The next message, polling for up to `spin` before blocking, for at most `timeout` in all
/// (`None`: no end).
fn recv_after_spinning(rx: &mpsc::Receiver<Msg>, spin: Duration, timeout: Option<Duration>) -> Result<Msg, mpsc::RecvTimeoutError> {
    let started = Instant::now();
    let spin = timeout.map_or(spin, |t| spin.min(t));
    while started.elapsed() < spin {
        match rx.try_recv() {
            Ok(msg) => return Ok(msg),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvTimeoutError::Disconnected),
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    match timeout {
        Some(t) => rx.recv_timeout(t.saturating_sub(started.elapsed())),
        None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
    }
}

/// Sets one moment of each request with a text in `batch` (`moment` picks which) to now, unless
/// an earlier batch of the request set it.
fn note_first(jobs: &mut HashMap<u64, Pending>, batch: &[Seq], moment: fn(&mut Pending) -> &mut Option<Instant>) {
    let now = Instant::now();
    for s in batch {
        if let Some(p) = jobs.get_mut(&s.job) {
            moment(p).get_or_insert(now);
        }
    }
}

/// Size, padded tokens, padding share and real tokens of a forward pass.
fn record_batch(model: &str, batch: &[Seq]) {
    let real: usize = batch.iter().map(|s| s.ids.len()).sum();
    let padded = batch.iter().map(|s| s.ids.len()).max().unwrap_or(0) * batch.len();
    let model = model.to_string();
    metrics::histogram!(crate::metrics::BATCH_SIZE, "model" => model.clone()).record(batch.len() as f64);
    metrics::histogram!(crate::metrics::BATCH_TOKENS, "model" => model.clone()).record(padded as f64);
    if padded > 0 {
        metrics::histogram!(crate::metrics::BATCH_PADDING, "model" => model.clone()).record(1.0 - real as f64 / padded as f64);
    }
    metrics::counter!(crate::metrics::TOKENS, "model" => model).increment(real as u64);
}
