//! [`EmbeddingModel`]: a model folder loaded for embedding — encoder, sentence-transformers head,
//! tokenizer and prompts — and the batch path ids → padded batch → forward → pool → head → host.
//!
//! The text side ([`Preprocessor`]) is `Send + Sync` and can tokenize on any thread; the MLX side
//! stays on the thread that loaded it.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{quote, Error, Result};
use crate::mlx::{self, Array, Compiled, Dtype};
use crate::models::files::read_json;
use crate::models::gemma3::Gemma3;
use crate::models::head::{load_head, load_prompts, max_seq_length, Head, Pooling};
use crate::models::qwen3::Qwen3;
use crate::models::weights::{Quant, Weights};
use crate::models::Encoder;
use crate::tokenize::{Encoded, TextTokenizer, Truncation};

/// Qwen3-Embedding's `query` prompt (config_sentence_transformers.json of the official model).
pub const QWEN3_QUERY_PROMPT: &str =
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen3,
    Gemma3,
}

impl Architecture {
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma3 => "gemma3_text",
        }
    }

    /// How a custom instruction becomes a prompt, following each model card.
    fn instruction_prompt(self, instruction: &str) -> String {
        match self {
            Architecture::Qwen3 => format!("Instruct: {instruction}\nQuery:"),
            Architecture::Gemma3 => format!("task: {instruction} | query: "),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Compute dtype; `None` picks bf16 on a GPU and f32 on the CPU.
    pub dtype: Option<Dtype>,
    pub gpu: bool,
    /// Run the encoder of large batches through `mlx::core::compile` (one trace per padded
    /// batch shape, fused elementwise kernels); `None` compiles on a GPU only. MLX's CPU backend
    /// compiles by running a C++ compiler at run time and falls back to the plain graph without
    /// one.
    pub compile: Option<bool>,
    /// The smallest batch (rows × padded length) that runs compiled; `None`:
    /// [`DEFAULT_COMPILE_MIN_TOKENS`] on a GPU, every batch on the CPU.
    pub compile_min_tokens: Option<usize>,
    /// Run batches at a few padded shapes as on a GPU (`padded_shape`); `None`: on a GPU only.
    pub gpu_shapes: Option<bool>,
}

/// Below this many tokens a batch runs the plain graph on a GPU: MLX's host work per operation
/// bounds small batches, replaying a compiled trace costs more host time than the fused kernels
/// save, and tracing a new shape takes 0.3–1 s (measured on an H100, BENCHMARKS.md).
pub const DEFAULT_COMPILE_MIN_TOKENS: usize = 1024;

/// Which prompt to put before a text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PromptChoice {
    /// The model's `default_prompt_name`, if any.
    #[default]
    Default,
    /// No prompt.
    None,
    /// A prompt of `config_sentence_transformers.json` by name (`query`, `document`, …).
    Name(String),
    /// A task description, formatted the way the model card says.
    Instruction(String),
}

/// What a loaded model is, for the API, the log and the CLI.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub hidden_size: i32,
    /// Length of the full output vector.
    pub dimensions: i32,
    /// Sizes `dimensions` may be cut to (Matryoshka), largest first.
    pub allowed_dimensions: Vec<i32>,
    pub max_tokens: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    pub dtype: Dtype,
    pub gpu: bool,
    pub quantization: Option<Quant>,
    pub prompts: BTreeMap<String, String>,
    pub default_prompt: Option<String>,
}

/// Tokenization with prompts: everything of a model that does not touch MLX.
pub struct Preprocessor {
    pub info: ModelInfo,
    tokenizer: TextTokenizer,
    /// Rows of the embedding table: a token id at or past it has no embedding. Real tokenizers can
    /// list more tokens than the table has (EmbeddingGemma's `<image_soft_token>`, id 262144 of a
    /// 262,144-row table), so this is checked per text, not at load.
    vocab: usize,
}

impl Preprocessor {
    /// The prompt text `choice` stands for.
    pub fn prompt(&self, choice: &PromptChoice) -> Result<String> {
        Ok(match choice {
            PromptChoice::None => String::new(),
            PromptChoice::Default => match &self.info.default_prompt {
                Some(name) => self.info.prompts[name].clone(),
                None => String::new(),
            },
            PromptChoice::Name(name) => self.info.prompts.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = self.info.prompts.keys().map(String::as_str).collect();
                Error::invalid("prompt_name", format!("unknown prompt {} (this model has: {})", quote(name),
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }))
            })?,
            PromptChoice::Instruction(task) => self.info.architecture.instruction_prompt(task),
        })
    }

    /// Token ids of `prompt + text`, limited to `max_tokens` (the model's limit when `None`).
    pub fn tokenize(&self, prompt: &str, text: &str, max_tokens: Option<usize>, truncation: Truncation) -> Result<Encoded> {
        let limit = max_tokens.unwrap_or(self.info.max_tokens).min(self.info.max_tokens);
        let enc = self.tokenizer.encode(prompt, text, limit, truncation)?;
        // A tokenizer without special tokens can turn a text into nothing; the model cannot embed
        // an empty sequence, and one such text must not fail the batch it would join.
        if enc.ids.is_empty() {
            return Err(Error::invalid("text", "the text has no tokens"));
        }
        if let Some(&id) = enc.ids.iter().find(|&&id| id as usize >= self.vocab) {
            let token = self.tokenizer.token(id).unwrap_or_default();
            return Err(Error::invalid("text", format!(
                "contains the token `{token}` (id {id}), which this model has no embedding for \
                 (its table has {} rows)", self.vocab)));
        }
        Ok(enc)
    }

    /// Checks a requested output size against the model's Matryoshka sizes.
    pub fn check_dimensions(&self, dimensions: Option<i32>) -> Result<i32> {
        match dimensions {
            None => Ok(self.info.dimensions),
            Some(d) if self.info.allowed_dimensions.contains(&d) => Ok(d),
            Some(d) => Err(Error::invalid("dimensions", format!(
                "{d} is not allowed for this model (allowed: {})", describe_sizes(&self.info.allowed_dimensions)))),
        }
    }
}

fn describe_sizes(sizes: &[i32]) -> String {
    let contiguous = sizes.windows(2).all(|w| w[0] == w[1] + 1);
    match (contiguous && sizes.len() > 4, sizes.first(), sizes.last()) {
        (true, Some(hi), Some(lo)) => format!("any size from {lo} to {hi}"),
        _ => sizes.iter().map(i32::to_string).collect::<Vec<_>>().join(", "),
    }
}

pub struct EmbeddingModel {
    pre: Arc<Preprocessor>,
    encoder: Rc<dyn Encoder>,
    head: Head,
    /// The device the model was loaded for: MLX builds operations on the default device, which the
    /// last model loaded set.
    gpu: bool,
    /// Whether batches run at GPU shapes ([`padded_shape`]).
    gpu_shapes: bool,
    /// Compiled encoders by padded batch shape, when compiling.
    compiled: Option<RefCell<CompiledShapes>>,
    /// The padded batch shapes run so far (up to [`MAX_TRACKED_SHAPES`]).
    shapes: RefCell<HashSet<(usize, usize)>>,
}

/// Shapes [`EmbeddingModel::shapes_seen`] tracks at most (16 bytes each).
const MAX_TRACKED_SHAPES: usize = 65_536;

impl EmbeddingModel {
    /// Loads a model folder in Hugging Face layout. Must run on the thread that will use it.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<EmbeddingModel> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "no such model folder"));
        }
        let config_path = dir.join("config.json");
        let raw: Value = read_json(&config_path, "the model's architecture")?;
        let model_type = raw.get("model_type").and_then(Value::as_str)
            .ok_or_else(|| Error::field(&config_path, "model_type", "missing"))?;
        let architecture = match model_type {
            "qwen3" => Architecture::Qwen3,
            "gemma3_text" => Architecture::Gemma3,
            other => return Err(Error::field(&config_path, "model_type",
                format!("unsupported `{other}` (supported: qwen3, gemma3_text)"))),
        };
        mlx::set_default_device(opts.gpu)?;
        let dtype = opts.dtype.unwrap_or(if opts.gpu { Dtype::Bfloat16 } else { Dtype::Float32 });
        if !matches!(dtype, Dtype::Float32 | Dtype::Bfloat16) {
            return Err(Error::invalid("dtype", format!("{dtype} is not a compute dtype (use float32 or bfloat16)")));
        }

        // Head first: a folder that cannot be served is refused before reading weights.
        let hidden_hint = raw.get("hidden_size").and_then(Value::as_i64).unwrap_or(0) as i32;
        let head = match (load_head(dir, hidden_hint)?, architecture) {
            (Some(head), _) => head,
            (None, Architecture::Qwen3) => {
                tracing::info!(dir = %dir.display(),
                    "no sentence-transformers files (modules.json): Qwen3 pooling follows the architecture: last token, L2-normalized");
                Head { pooling: Pooling::LastToken, dense: vec![], normalize: true, source: "architecture default".into() }
            }
            (None, Architecture::Gemma3) => return Err(Error::file(&dir.join("modules.json"),
                "missing: EmbeddingGemma needs its sentence-transformers head (modules.json, \
                 1_Pooling/config.json, 2_Dense/, 3_Dense/); copy them from the original checkpoint")),
        };

        let mut weights = Weights::open(dir, dtype, opts.gpu)?;
        weights.set_quantization(&config_path, raw.get("quantization").or_else(|| raw.get("quantization_config")))?;
        let encoder: Rc<dyn Encoder> = match architecture {
            Architecture::Qwen3 => Rc::new(Qwen3::load(&config_path, &raw, &mut weights)?),
            Architecture::Gemma3 => Rc::new(Gemma3::load(&config_path, &raw, &mut weights)?),
        };
        weights.warn_unread();
        let quantization = quant_info(&raw);
        let dims = encoder.dims();

        let eos = match architecture {
            Architecture::Qwen3 => Some("<|endoftext|>"),
            Architecture::Gemma3 => None,
        };
        let tokenizer = TextTokenizer::load(dir, eos)?;
        if tokenizer.appends_eos() {
            tracing::info!(dir = %dir.display(), "tokenizer does not end sequences with <|endoftext|>: appending it");
        }
        if tokenizer.vocab_size() > dims.vocab as usize {
            tracing::info!(dir = %dir.display(), tokens = tokenizer.vocab_size(), rows = dims.vocab,
                "the tokenizer lists tokens past the embedding table: texts that contain them are refused");
        }
        let mut prompts = load_prompts(dir)?;
        if prompts.prompts.is_empty() && architecture == Architecture::Qwen3 {
            // mlx-lm conversions drop config_sentence_transformers.json; Qwen3-Embedding's own
            // prompts are the model card's.
            prompts.prompts = BTreeMap::from([
                ("query".to_string(), QWEN3_QUERY_PROMPT.to_string()),
                ("document".to_string(), String::new()),
            ]);
            tracing::info!(dir = %dir.display(), "no prompts in the folder: using Qwen3-Embedding's query/document prompts");
        }
        let max_tokens = max_seq_length(dir)?.unwrap_or(i32::MAX).min(dims.max_positions).max(1) as usize;
        let dimensions = head.output_dim(dims.hidden);
        let info = ModelInfo {
            architecture,
            hidden_size: dims.hidden,
            dimensions,
            allowed_dimensions: matryoshka_sizes(architecture, dimensions),
            max_tokens,
            pooling: head.pooling,
            normalize: head.normalize,
            dtype,
            gpu: opts.gpu,
            quantization,
            prompts: prompts.prompts,
            default_prompt: prompts.default_prompt_name,
        };
        let compile = opts.compile.unwrap_or(opts.gpu);
        tracing::info!(dir = %dir.display(), model_type, dims = dimensions, %dtype, gpu = opts.gpu, compile,
            pooling = info.pooling.name(), head = %head.source, "model loaded");
        let min_tokens = opts.compile_min_tokens.unwrap_or(if opts.gpu { DEFAULT_COMPILE_MIN_TOKENS } else { 0 });
        let compiled = compile.then(|| RefCell::new(CompiledShapes::new(min_tokens)));
        Ok(EmbeddingModel { pre: Arc::new(Preprocessor { info, tokenizer, vocab: dims.vocab as usize }), encoder, head, gpu: opts.gpu, gpu_shapes: opts.gpu_shapes.unwrap_or(opts.gpu), compiled, shapes: RefCell::default() })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.pre.info
    }

    /// The text side, shareable with other threads.
    pub fn preprocessor(&self) -> Arc<Preprocessor> {
        Arc::clone(&self.pre)
    }

    /// Embeds token sequences as one right-padded batch. Returns the head's output per sequence
    /// (full size, not normalized; see [`finish`]).
    pub fn embed_ids(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        self.launch(batch)?.collect()
    }

    /// Builds the batch's graph and starts computing it without waiting ([`Launched::collect`]
    /// waits and copies the vectors out).
    pub fn launch(&self, batch: &[&[u32]]) -> Result<Launched> {
        let started = Instant::now();
        let out = self.graph(batch)?;
        let built = Instant::now();
        if let Some(out) = &out {
            out.async_eval()?;
        }
        let (padded_rows, padded_len) = self.padded(batch);
        Ok(Launched {
            out,
            rows: batch.len(),
            padded: (padded_rows, padded_len),
            overlaps: overlaps_next_launch(self.gpu, padded_rows, padded_len),
            build: built - started,
            submit: built.elapsed(),
        })
    }

    /// The batch's graph up to the head's output `[B, dims]` as f32 in row-major order (ready
    /// to copy out: collecting it waits for this batch alone), not computed yet (`None` for an
    /// empty batch).
    pub fn graph(&self, batch: &[&[u32]]) -> Result<Option<Array>> {
        self.head_graph(batch)?.map(|out| out.for_host()).transpose().map_err(Into::into)
    }

    fn head_graph(&self, batch: &[&[u32]]) -> Result<Option<Array>> {
        if batch.is_empty() {
            return Ok(None);
        }
        if let Some(i) = batch.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(format!("items[{i}]"), "no tokens"));
        }
        // A gather past the table reads out of bounds: ids that did not come through
        // `Preprocessor::tokenize` are checked here too.
        let vocab = self.vocab_size();
        if let Some((i, &id)) = batch.iter().enumerate().find_map(|(i, s)| s.iter().find(|&&id| id as usize >= vocab).map(|id| (i, id))) {
            return Err(Error::invalid(format!("items[{i}]"), format!("token id {id} is past the embedding table ({vocab} rows)")));
        }
        mlx::set_default_device(self.gpu)?;
        if self.gpu_shapes || self.compiled.is_some() || batch.len() < 2 {
            return self.padded_graph(batch).map(Some);
        }
        // On the CPU padding costs as much as real tokens: the batch runs as groups of similar
        // lengths, each padded to its own longest, and the rows are put back in order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].len());
        let sorted: Vec<&[u32]> = order.iter().map(|&i| batch[i]).collect();
        let ends = length_groups(&sorted.iter().map(|s| s.len()).collect::<Vec<_>>(), CPU_GROUP_COST_TOKENS);
        if ends.len() == 1 {
            return self.padded_graph(batch).map(Some);
        }
        let mut out: Option<Array> = None;
        let mut start = 0;
        for end in ends {
            let part = self.padded_graph(&sorted[start..end])?;
            out = Some(match out {
                None => part,
                Some(o) => o.concatenate(&part, 0)?,
            });
            start = end;
        }
        let mut row_of = vec![0i32; batch.len()];
        for (pos, &i) in order.iter().enumerate() {
            row_of[i] = pos as i32;
        }
        let rows = Array::from_i32(&row_of, &[batch.len() as i32])?;
        Ok(Some(out.expect("at least one group").take(&rows, 0)?))
    }

    /// [`EmbeddingModel::graph`] for a batch run as one padded forward.
    fn padded_graph(&self, batch: &[&[u32]]) -> Result<Array> {
        // Batches run at a few padded shapes (extra rows of one token, masked key positions):
        // the first forward of a new shape is slow (see `padded_shape`).
        let max_len = self.encoder.dims().max_positions as usize;
        let (rows, len) = self.padded(batch);
        let compiled = self.compiled.as_ref().filter(|c| c.borrow().applies(rows, len));
        let (rows, len) = match compiled {
            Some(_) => padded_shape(self.gpu_shapes, true, rows, len, max_len),
            None => (rows, len),
        };
        let mut shapes = self.shapes.borrow_mut();
        if shapes.len() < MAX_TRACKED_SHAPES {
            shapes.insert((rows, len));
        }
        drop(shapes);
        let mut lengths = vec![1i32; rows];
        let mut ids = vec![0i32; rows * len];
        for (row, seq) in batch.iter().enumerate() {
            lengths[row] = seq.len() as i32;
            for (j, &t) in seq.iter().enumerate() {
                ids[row * len + j] = t as i32;
            }
        }
        let ids = Array::from_i32(&ids, &[rows as i32, len as i32])?;
        let masks = self.encoder.masks(&lengths, len as i32)?;
        let hidden = match compiled {
            Some(c) => c.borrow_mut().encode(&self.encoder, ids, masks)?,
            None => self.encoder.encode(&ids, &masks)?,
        };
        let out = self.head.forward(&hidden, &lengths)?;
        if rows == batch.len() {
            return Ok(out);
        }
        let dims = out.shape()[1];
        Ok(out.slice(&[0, 0], &[batch.len() as i32, dims])?)
    }

    /// The shape `batch` is padded to when it runs as one forward, before a compiled encoder's
    /// rounding ([`padded_shape`]).
    fn padded(&self, batch: &[&[u32]]) -> (usize, usize) {
        let len = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        padded_shape(self.gpu_shapes, false, batch.len(), len, self.encoder.dims().max_positions as usize)
    }

    /// How many distinct padded batch shapes (rows × tokens) this model has run, up to 65,536.
    /// A shape's first forward costs more than the next ones: MLX builds its kernels for it
    /// (on a GPU, 50 ms to 1 s with a compiled trace, measured on an H100).
    pub fn shapes_seen(&self) -> usize {
        self.shapes.borrow().len()
    }

    /// Size of the encoder's token table.
    pub fn vocab_size(&self) -> usize {
        self.encoder.dims().vocab as usize
    }

    /// Tokenizes and embeds `texts` as one padded batch, with the model's normalization.
    pub fn embed_texts(&self, texts: &[String], prompt: &PromptChoice, dimensions: Option<i32>) -> Result<Vec<Vec<f32>>> {
        let dims = self.pre.check_dimensions(dimensions)?;
        let prompt = self.pre.prompt(prompt)?;
        let ids = texts.iter().map(|t| Ok(self.pre.tokenize(&prompt, t, None, Truncation::Right)?.ids)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let normalize = self.pre.info.normalize;
        Ok(self.embed_ids(&refs)?.into_iter().map(|v| finish(v, dims as usize, normalize)).collect())
    }
}

/// What one more forward costs on the CPU beyond its tokens, in tokens: MLX's host work for a
/// forward's few thousand operations (≈ 70 ms at 1×16 for EmbeddingGemma-300m shapes on a
/// 2-core VM, where a token costs ≈ 2.5 ms).
const CPU_GROUP_COST_TOKENS: usize = 32;

/// Splits lengths sorted in increasing order into consecutive groups that minimize the padded
/// tokens computed (each group padded to its longest) plus `group_cost` per group; returns each
/// group's end index.
fn length_groups(sorted: &[usize], group_cost: usize) -> Vec<usize> {
    let n = sorted.len();
    // best[j]: the cheapest split of the first j; from[j]: where its last group starts.
    let mut best = vec![0usize; n + 1];
    let mut from = vec![0usize; n + 1];
    for j in 1..=n {
        let (cost, i) = (0..j).map(|i| (best[i] + (j - i) * sorted[j - 1] + group_cost, i)).min().expect("j ≥ 1");
        best[j] = cost;
        from[j] = i;
    }
    let mut ends = vec![];
    let mut j = n;
    while j > 0 {
        ends.push(j);
        j = from[j];
    }
    ends.reverse();
    ends
}

/// Padded tokens up to which a GPU forward costs about the same whatever its shape: bound by
/// MLX's host work per operation, not by computing (H100, BENCHMARKS.md).
const GPU_LAUNCH_BOUND_TOKENS: usize = 4096;

/// Padded tokens up to which a GPU batch's device work ends about when its launch does (H100,
/// `mlx-embed profile`: 0.05–0.9 ms of waiting after 3–5 ms of launching, up to 16×64 tokens;
/// 32×128 takes 11–15 ms in all).
const GPU_SHORT_DEVICE_TAIL_TOKENS: usize = 1024;

/// Whether the device still computes a batch padded to `rows` × `len` tokens long after its
/// launch (see [`Launched::overlaps`]).
fn overlaps_next_launch(gpu: bool, rows: usize, len: usize) -> bool {
    gpu && rows.saturating_mul(len) > GPU_SHORT_DEVICE_TAIL_TOKENS
}

/// The shape a batch of `rows` × `len` tokens runs at. On a GPU every new shape costs a slow
/// first forward (50–150 ms measured on an H100, 0.3–1 s compiled: kernel plans and traces), so
/// batches there run at few shapes: the lengths of launch-bound batches round up to a multiple of
/// 8 (of 32 past 64 tokens, of 128 past 512), their rows to a power of two up to 8, then to a
/// multiple of 8. Batches past [`GPU_LAUNCH_BOUND_TOKENS`] pay for padding in device time: their
/// rows stay, their lengths round up to a multiple of 8 (of 32 past 512). On the CPU, where
/// padding is real work, only compiled batches' lengths round up (to a multiple of 8). Never past
/// `max_len` unless `len` is.
fn padded_shape(gpu: bool, compiled: bool, rows: usize, len: usize, max_len: usize) -> (usize, usize) {
    let step = match len {
        _ if !gpu && !compiled => 1,
        _ if !gpu => 8,
        0..=512 if rows.saturating_mul(len) > GPU_LAUNCH_BOUND_TOKENS => 8,
        513.. if rows.saturating_mul(len) > GPU_LAUNCH_BOUND_TOKENS => 32,
        0..=64 => 8,
        65..=512 => 32,
        _ => 128,
    };
    let len = len.div_ceil(step).saturating_mul(step).min(max_len.max(len));
    let rows = match rows {
        _ if !gpu => rows,
        r if r.saturating_mul(len) > GPU_LAUNCH_BOUND_TOKENS => r,
        0..=8 => rows.next_power_of_two(),
        r => r.div_ceil(8) * 8,
    };
    (rows, len)
}

/// Compiled encoders, one per padded batch shape, the least recently used dropped past
/// [`CompiledShapes::CAPACITY`] (dropping one frees MLX's trace of it).
struct CompiledShapes {
    min_tokens: usize,
    by_shape: HashMap<(usize, usize), (Compiled, u64)>,
    calls: u64,
}

impl CompiledShapes {
    const CAPACITY: usize = 64;

    fn new(min_tokens: usize) -> CompiledShapes {
        CompiledShapes { min_tokens, by_shape: HashMap::new(), calls: 0 }
    }

    /// Whether a batch of `rows` × `len` tokens runs compiled.
    fn applies(&self, rows: usize, len: usize) -> bool {
        rows.saturating_mul(len) >= self.min_tokens
    }

    /// Runs `encoder` on `ids` and `masks` through the compiled function for their shape.
    fn encode(&mut self, encoder: &Rc<dyn Encoder>, ids: Array, masks: Vec<Array>) -> Result<Array> {
        let shape = ids.shape();
        let key = (shape[0] as usize, shape[1] as usize);
        self.calls += 1;
        if !self.by_shape.contains_key(&key) {
            if self.by_shape.len() >= Self::CAPACITY {
                let oldest = self.by_shape.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.by_shape.remove(&k);
                }
            }
            let enc = Rc::clone(encoder);
            let f = Compiled::new(move |inputs: &[Array]| {
                let hidden = enc.encode(&inputs[0], &inputs[1..]).map_err(|e| mlx::MlxError(e.to_string()))?;
                Ok(vec![hidden])
            })?;
            self.by_shape.insert(key, (f, 0));
        }
        let entry = self.by_shape.get_mut(&key).expect("inserted above");
        entry.1 = self.calls;
        let mut inputs = Vec::with_capacity(1 + masks.len());
        inputs.push(ids);
        inputs.extend(masks);
        let mut out = entry.0.call(&inputs)?;
        out.pop().ok_or_else(|| Error::from(mlx::MlxError("the compiled encoder returned nothing".into())))
    }
}

/// A batch whose computation has started.
pub struct Launched {
    out: Option<Array>,
    rows: usize,
    padded: (usize, usize),
    overlaps: bool,
    build: Duration,
    submit: Duration,
}

impl Launched {
    /// Whether building the next batch while the device computes this one pays: on a GPU, past
    /// [`GPU_SHORT_DEVICE_TAIL_TOKENS`]. Otherwise the device is done about when the launch
    /// returns (on the CPU, MLX computes most of a batch while it is handed over), and collecting
    /// it first answers its requests without waiting for the next batch's launch.
    pub fn overlaps(&self) -> bool {
        self.overlaps
    }

    /// The batch's padded shape, rows × tokens (on the CPU a compiled encoder rounds the length
    /// further; see `padded_shape`).
    pub fn padded_shape(&self) -> (usize, usize) {
        self.padded
    }

    /// Host time spent building the batch's graph, then handing it to MLX to compute.
    pub fn host_times(&self) -> (Duration, Duration) {
        (self.build, self.submit)
    }

    /// Waits for the batch and copies its vectors out (one copy per batch).
    pub fn collect(self) -> Result<Vec<Vec<f32>>> {
        let Some(out) = self.out else { return Ok(vec![]) };
        let flat = out.to_f32_vec()?;
        let dim = flat.len() / self.rows;
        Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
    }
}

/// Final vector: cut to `dims` (Matryoshka), then L2-normalize when asked (after the cut, so a
/// shortened vector is unit length too). Zero vectors stay zero.
pub fn finish(mut v: Vec<f32>, dims: usize, normalize: bool) -> Vec<f32> {
    v.truncate(dims);
    if normalize {
        let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt().max(1e-12);
        for x in &mut v {
            *x = (*x as f64 / norm) as f32;
        }
    }
    v
}

/// Sizes a vector of `dims` may be cut to. EmbeddingGemma (768-d): the sizes it was trained for
/// (768, 512, 256, 128). Qwen3-Embedding and other widths: any size from 32 up.
fn matryoshka_sizes(arch: Architecture, dims: i32) -> Vec<i32> {
    match arch {
        Architecture::Gemma3 if dims == 768 => vec![768, 512, 256, 128],
        _ => (32.min(dims)..=dims).rev().collect(),
    }
}

fn quant_info(raw: &Value) -> Option<Quant> {
    let q = raw.get("quantization")?;
    Some(Quant {
        group_size: q.get("group_size")?.as_i64()? as i32,
        bits: q.get("bits")?.as_i64()? as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_batches_run_at_few_shapes_within_the_model_limit() {
        let gpu = |rows, len| padded_shape(true, false, rows, len, 8192);
        let lens: Vec<usize> = [1, 11, 16, 17, 64, 65, 200, 512, 513, 600].iter().map(|&l| gpu(1, l).1).collect();
        assert_eq!(lens, vec![8, 16, 16, 24, 64, 96, 224, 512, 640, 640]);
        assert_eq!([gpu(1, 11), gpu(3, 16), gpu(9, 64), gpu(33, 24)], [(1, 16), (4, 16), (16, 64), (40, 24)]);
        // Large batches keep their rows, and their lengths take finer steps: padding there is
        // real work.
        assert_eq!([gpu(33, 130), gpu(64, 200), gpu(64, 201), gpu(16, 600)], [(33, 136), (64, 200), (64, 208), (16, 608)]);
        assert_eq!([gpu(16, 255), gpu(17, 255)], [(16, 256), (17, 256)]);
        assert_eq!([gpu(16, 200), gpu(21, 200)], [(16, 224), (21, 200)]);
        // Never past the model's limit, unless the batch itself is.
        assert_eq!((padded_shape(true, false, 1, 60, 62), padded_shape(true, false, 1, 70, 62)), ((1, 62), (1, 70)));
        // Short queries, 1 to 64 to a batch, run at few shapes.
        let shapes: std::collections::HashSet<_> = (1..=64).flat_map(|r| (4..=24).map(move |l| gpu(r, l))).collect();
        assert_eq!(shapes.len(), 11 * 3, "{shapes:?}");
        // One row: steps of 8, 32 and 128 tokens, then of 32 past the launch-bound size.
        let lengths: std::collections::HashSet<usize> = (1..=8192).map(|l| gpu(1, l).1).collect();
        assert_eq!(lengths.len(), 8 + 14 + (4096 - 512) / 128 + (8192 - 4096) / 32);
    }

    #[test]
    fn length_groups_trade_padding_against_forwards() {
        // Equal lengths: one group. Far apart: one group each. Close: together.
        assert_eq!(length_groups(&[100; 8], 32), vec![8]);
        assert_eq!(length_groups(&[10, 200], 32), vec![1, 2]);
        assert_eq!(length_groups(&[100, 101, 102, 250, 251], 32), vec![3, 5]);
        // The split found costs no more than any other split of a small case.
        let lens = [130, 150, 171, 190, 200, 220, 240, 255];
        let cost = |ends: &[usize]| {
            let mut start = 0;
            ends.iter().map(|&e| { let c = (e - start) * lens[e - 1] + 32; start = e; c }).sum::<usize>()
        };
        let found = cost(&length_groups(&lens, 32));
        for mask in 0u32..128 {
            let mut ends: Vec<usize> = (1..8).filter(|i| mask & (1 << (i - 1)) != 0).collect();
            ends.push(8);
            assert!(found <= cost(&ends), "{mask:b}");
        }
    }

    #[test]
    fn only_long_gpu_batches_overlap_the_next_launch() {
        // Queries, up to 64 of 16 tokens, are answered before the next launch; documents overlap.
        assert!(!overlaps_next_launch(true, 1, 16) && !overlaps_next_launch(true, 64, 16) && !overlaps_next_launch(true, 16, 64));
        assert!(overlaps_next_launch(true, 16, 65) && overlaps_next_launch(true, 64, 256));
        // On the CPU the batch is done when its launch returns.
        assert!(!overlaps_next_launch(false, 64, 256));
    }

    #[test]
    fn cpu_batches_pad_only_compiled_lengths() {
        assert_eq!(padded_shape(false, false, 3, 11, 8192), (3, 11));
        assert_eq!(padded_shape(false, true, 3, 11, 8192), (3, 16));
        assert_eq!(padded_shape(false, true, 7, 230, 8192), (7, 232));
    }

    #[test]
    fn only_batches_of_enough_tokens_run_compiled() {
        let c = CompiledShapes::new(1024);
        assert!(!c.applies(1, 16) && !c.applies(8, 127) && c.applies(8, 128) && c.applies(64, 256));
        assert!(CompiledShapes::new(0).applies(1, 1));
    }

    #[test]
    fn finish_cuts_then_renormalizes() {
        let v = finish(vec![3.0, 4.0, 12.0], 2, true);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7, "{v:?}");
    }

    #[test]
    fn finish_without_normalize_only_cuts() {
        assert_eq!(finish(vec![3.0, 4.0, 12.0], 2, false), vec![3.0, 4.0]);
    }

    #[test]
    fn finish_keeps_a_zero_vector_finite() {
        assert_eq!(finish(vec![0.0; 4], 4, true), vec![0.0; 4]);
    }

    #[test]
    fn embeddinggemma_sizes_are_the_trained_ones() {
        assert_eq!(matryoshka_sizes(Architecture::Gemma3, 768), vec![768, 512, 256, 128]);
        assert_eq!(matryoshka_sizes(Architecture::Gemma3, 48), (32..=48).rev().collect::<Vec<_>>());
    }

    #[test]
    fn qwen3_allows_every_size_from_32() {
        let s = matryoshka_sizes(Architecture::Qwen3, 1024);
        assert_eq!((s.len(), s[0], *s.last().unwrap()), (993, 1024, 32));
        assert_eq!(describe_sizes(&s), "any size from 32 to 1024");
    }
}
