//! Weights of a model folder: `model.safetensors` or the shards named by
//! `model.safetensors.index.json`, memory-mapped by MLX. Tensors are looked up by their path in the
//! checkpoint tree with or without the `model.` prefix (sentence-transformers' `Qwen3Model` /
//! `Gemma3TextModel` checkpoints have none; causal-LM and mlx-lm ones do), shape-checked, and
//! converted to the compute dtype. MLX affine-quantized modules (`<path>.scales` present) stay
//! packed and run through `quantized_matmul`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::mlx::{Array, Dtype, TensorFile};
use crate::models::files::read_json;
use crate::models::kernel_check;
use crate::models::layers::{Embedding, Linear, QuantizedWeight};

/// MLX quantization settings (`quantization` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quant {
    pub group_size: i32,
    pub bits: i32,
}

pub struct Weights {
    files: Vec<(PathBuf, TensorFile)>,
    /// Canonical tensor name (no `model.` prefix) → (file index, name as stored).
    names: HashMap<String, (usize, String)>,
    compute: Dtype,
    /// Whether the model runs on a GPU (quantized kernels differ in precision by backend).
    gpu: bool,
    /// Default quantization and per-module overrides (`None` = that module is not quantized).
    quant: Option<Quant>,
    quant_overrides: HashMap<String, Option<Quant>>,
    /// Whether the device's quantized kernels passed the check, per (bits, group, in, out).
    kernel_ok: HashMap<(i32, i32, i32, i32), bool>,
    config_path: PathBuf,
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl Weights {
    /// Opens the weights of `dir` (single file or sharded) to be used in `compute` dtype on the
    /// GPU or the CPU.
    pub fn open(dir: &Path, compute: Dtype, gpu: bool) -> Result<Weights> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shard_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index_path.exists() {
            let index: Index = read_json(&index_path, "")?;
            let mut v: Vec<String> = index.weight_map.into_values().collect();
            v.sort();
            v.dedup();
            v
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() {
                " (pytorch_model.bin is not supported: convert the checkpoint to safetensors)"
            } else {
                ""
            };
            return Err(Error::file(&single, format!("missing, and no model.safetensors.index.json either{hint}")));
        };
        shard_names.retain(|s| !s.is_empty());
        let mut files = Vec::new();
        let mut names = HashMap::new();
        for shard in shard_names {
            let path = dir.join(&shard);
            if !path.exists() {
                return Err(Error::file(&path, "missing (named by model.safetensors.index.json)"));
            }
            let file = TensorFile::open(&path).map_err(|e| Error::file(&path, format!("not a readable safetensors file: {}", e.0)))?;
            for stored in file.names() {
                let canonical = stored.strip_prefix("model.").unwrap_or(&stored).to_string();
                names.insert(canonical, (files.len(), stored));
            }
            files.push((path, file));
        }
        Ok(Weights {
            files,
            names,
            compute,
            gpu,
            quant: None,
            quant_overrides: HashMap::new(),
            kernel_ok: HashMap::new(),
            config_path: dir.join("config.json"),
        })
    }

    /// Reads the `quantization` block of config.json (raw JSON, as mlx-lm writes it).
    pub fn set_quantization(&mut self, config_path: &Path, raw: Option<&serde_json::Value>) -> Result<()> {
        self.config_path = config_path.to_path_buf();
        let Some(serde_json::Value::Object(map)) = raw else {
            if let Some(v) = raw.filter(|v| !v.is_null()) {
                return Err(Error::field(config_path, "quantization", format!("expected an object, found {v}")));
            }
            return Ok(());
        };
        let parse = |field: &str, m: &serde_json::Map<String, serde_json::Value>| -> Result<Quant> {
            let int = |key: &str| -> Result<i32> {
                m.get(key).and_then(|v| v.as_i64()).map(|v| v as i32).ok_or_else(|| {
                    Error::field(config_path, format!("{field}.{key}"), "missing or not an integer")
                })
            };
            if let Some(mode) = m.get("mode").and_then(|v| v.as_str()) {
                if mode != "affine" {
                    return Err(Error::field(config_path, format!("{field}.mode"),
                        format!("unsupported quantization mode `{mode}` (only `affine` is supported)")));
                }
            }
            let q = Quant { group_size: int("group_size")?, bits: int("bits")? };
            if ![2, 3, 4, 5, 6, 8].contains(&q.bits) {
                return Err(Error::field(config_path, format!("{field}.bits"),
                    format!("unsupported: {} bits (supported: 2, 3, 4, 5, 6, 8)", q.bits)));
            }
            if ![32, 64, 128].contains(&q.group_size) {
                return Err(Error::field(config_path, format!("{field}.group_size"),
                    format!("unsupported: {} (supported: 32, 64, 128)", q.group_size)));
            }
            Ok(q)
        };
        self.quant = Some(parse("quantization", map)?);
        for (key, value) in map {
            let module = key.strip_prefix("model.").unwrap_or(key).to_string();
            match value {
                serde_json::Value::Object(m) => {
                    let q = parse(&format!("quantization.{key}"), m)?;
                    self.quant_overrides.insert(module, Some(q));
                }
                serde_json::Value::Bool(false) => {
                    self.quant_overrides.insert(module, None);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether projections that read the same input are fused into one matmul (q/k/v, gate/up):
    /// on a GPU, where a small batch's time is MLX's host work per operation.
    pub fn fuses_projections(&self) -> bool {
        self.gpu
    }

    pub fn compute_dtype(&self) -> Dtype {
        self.compute
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Tensors nothing has taken, as stored and with their file, sorted by name; leaves out those
    /// checkpoints carry for other uses ([`read_elsewhere`]). Once a model is built, any left
    /// mean config.json describes less than the checkpoint holds (fewer layers, say).
    pub fn unread(&self) -> Vec<(&Path, &str)> {
        let mut unread: Vec<(&Path, &str)> = self.names.iter()
            .filter(|(canonical, _)| !read_elsewhere(canonical))
            .map(|(_, (file, stored))| (self.files[*file].0.as_path(), stored.as_str()))
            .collect();
        unread.sort_by_key(|&(_, name)| name);
        unread
    }

    /// Logs a warning naming the [`unread`](Self::unread) tensors (the first few, and how many).
    /// A warning, not an error: transformers loads such a checkpoint too, warning of unexpected
    /// keys, and the model built is what config.json describes.
    pub fn warn_unread(&self) {
        const SHOWN: usize = 5;
        let unread = self.unread();
        if unread.is_empty() {
            return;
        }
        let mut tensors = unread.iter().take(SHOWN).map(|(_, name)| *name).collect::<Vec<_>>().join(", ");
        if unread.len() > SHOWN {
            tensors.push_str(", …");
        }
        let mut files: Vec<String> = unread.iter().map(|(path, _)| path.display().to_string()).collect();
        files.sort();
        files.dedup();
        tracing::warn!(config = %self.config_path.display(), files = %files.join(", "), unread = unread.len(), %tensors,
            "the checkpoint holds tensors the model described by config.json does not use (fewer layers than the \
             checkpoint?): they are ignored");
    }

    /// Takes a tensor as stored (no conversion), with the file it came from.
    fn take_raw(&mut self, name: &str) -> Result<(Array, PathBuf, String)> {
        let Some((file, stored)) = self.names.remove(name) else {
            let path = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
            return Err(Error::tensor(&path, name, "missing"));
        };
        let (path, tf) = &mut self.files[file];
        let a = tf.take(&stored).map_err(|e| Error::tensor(path, &stored, e.0))?;
        Ok((a, path.clone(), stored))
    }

    /// A float tensor of exactly `shape`, converted to the compute dtype.
    pub fn tensor(&mut self, name: &str, shape: &[i32]) -> Result<Array> {
        self.tensor_as(name, shape, self.compute)
    }

    /// A float tensor of exactly `shape`, converted to `dtype`.
    pub fn tensor_as(&mut self, name: &str, shape: &[i32], dtype: Dtype) -> Result<Array> {
        let (a, path, stored) = self.take_raw(name)?;
        check_shape(&a, &path, &stored, shape)?;
        let have = a.dtype()?;
        if !matches!(have, Dtype::Float32 | Dtype::Bfloat16 | Dtype::Float16) {
            return Err(Error::tensor(&path, &stored,
                format!("unsupported dtype {have} (expected float32, bfloat16 or float16)")));
        }
        Ok(if have == dtype { a } else { a.astype(dtype)? })
    }

    fn quant_for(&self, module: &str) -> Option<Quant> {
        match self.quant_overrides.get(module) {
            Some(q) => *q,
            None => self.quant,
        }
    }

    /// The packed weight of a quantized module `[rows, cols]`, or `None` when it is not quantized.
    fn quantized(&mut self, module: &str, rows: i32, cols: i32) -> Result<Option<QuantizedWeight>> {
        let scales_name = format!("{module}.scales");
        if !self.contains(&scales_name) {
            return Ok(None);
        }
        let Some(q) = self.quant_for(module) else {
            return Err(Error::field(&self.config_path.clone(), "quantization",
                format!("missing, but `{scales_name}` says `{module}` is quantized")));
        };
        if cols % q.group_size != 0 || (cols * q.bits) % 32 != 0 {
            return Err(Error::tensor(&self.config_path.clone(), &format!("{module}.weight"),
                format!("input size {cols} does not fit group_size {} and {} bits", q.group_size, q.bits)));
        }
        let (w, path, stored) = self.take_raw(&format!("{module}.weight"))?;
        let packed = [rows, cols * q.bits / 32];
        if w.shape() != packed {
            return Err(Error::tensor(&path, &stored, format!(
                "shape {:?}, expected {packed:?} ({} bits packed in uint32)", w.shape(), q.bits)));
        }
        if w.dtype()? != Dtype::Uint32 {
            return Err(Error::tensor(&path, &stored, format!("quantized weight must be uint32, found {}", w.dtype()?)));
        }
        let groups = cols / q.group_size;
        // MLX's CPU kernel keeps a bf16 running sum when the scales are bf16, which costs far more
        // accuracy than bf16 itself (cosine 0.993 instead of 0.999 on the test models); on the CPU
        // the quantized products therefore run in f32. GPU kernels accumulate in f32 already.
        let f32_accumulate = self.compute == Dtype::Bfloat16 && !self.gpu;
        let dtype = if f32_accumulate { Dtype::Float32 } else { self.compute };
        let scales = self.tensor_as(&scales_name, &[rows, groups], dtype)?;
        let biases = self.tensor_as(&format!("{module}.biases"), &[rows, groups], dtype)?;
        Ok(Some(QuantizedWeight { w, scales, biases, group_size: q.group_size, bits: q.bits, out: self.compute }))
    }

    /// A linear layer `in_dim → out_dim` at `module` (`.weight` `[out, in]`, optional `.bias`).
    pub fn linear(&mut self, module: &str, in_dim: i32, out_dim: i32, bias: bool) -> Result<Linear> {
        let bias = if bias { Some(self.tensor(&format!("{module}.bias"), &[out_dim])?) } else { None };
        if let Some(q) = self.quantized(module, out_dim, in_dim)? {
            if self.kernels_work(&q, in_dim, out_dim)? {
                return Ok(Linear::Quantized { q, bias });
            }
            let w = kernel_check::dequantize_on_cpu(&q, self.compute, self.gpu)?;
            return Ok(Linear::dense(w, bias)?);
        }
        let w = self.tensor(&format!("{module}.weight"), &[out_dim, in_dim])?;
        Ok(Linear::dense(w, bias)?)
    }

    /// An embedding table `[vocab, hidden]` at `module`.
    pub fn embedding(&mut self, module: &str, vocab: i32, hidden: i32) -> Result<Embedding> {
        if let Some(q) = self.quantized(module, vocab, hidden)? {
            if self.kernels_work(&q, hidden, vocab)? {
                return Ok(Embedding::Quantized(q));
            }
            return Ok(Embedding::Dense(kernel_check::dequantize_on_cpu(&q, self.compute, self.gpu)?));
        }
        Ok(Embedding::Dense(self.tensor(&format!("{module}.weight"), &[vocab, hidden])?))
    }

    /// On a GPU, whether its quantized kernels agree with the CPU for this shape (checked once per
    /// shape; see `kernel_check`). The CPU's kernels are the reference and are not checked.
    fn kernels_work(&mut self, q: &QuantizedWeight, in_dim: i32, out_dim: i32) -> Result<bool> {
        if !self.gpu {
            return Ok(true);
        }
        let key = (q.bits, q.group_size, in_dim, out_dim);
        if let Some(&ok) = self.kernel_ok.get(&key) {
            return Ok(ok);
        }
        let errors = kernel_check::check(q, in_dim, self.gpu)?;
        let ok = errors.ok();
        if !ok {
            tracing::warn!(bits = q.bits, group_size = q.group_size, in_dim, out_dim,
                matmul_error = errors.matmul, dequantize_error = errors.dequantize,
                failure = errors.failure.as_deref().unwrap_or(""),
                "this MLX backend's quantized kernels disagree with the CPU for this shape: \
                 using weights dequantized on the CPU instead");
        }
        self.kernel_ok.insert(key, ok);
        Ok(ok)
    }
}

/// Whether a tensor (canonical name) is one checkpoints carry for other uses than embedding, so
/// that leaving it unread says nothing about the config.
fn read_elsewhere(canonical: &str) -> bool {
    // A causal LM's output projection (`.weight`, or `.scales`/`.biases` when mlx-lm quantized
    // it): Qwen3 causal-LM checkpoints with untied embeddings have one; embeddings stop at the
    // last hidden state.
    canonical.starts_with("lm_head.")
        // RoPE frequencies older transformers versions saved as buffers; computed here from the
        // config (transformers ignores them on load as well).
        || canonical.ends_with("rotary_emb.inv_freq")
}

fn check_shape(a: &Array, path: &Path, name: &str, want: &[i32]) -> Result<()> {
    let have = a.shape();
    if have != want {
        return Err(Error::tensor(path, name, format!("shape {have:?}, expected {want:?}")));
    }
    Ok(())
}
