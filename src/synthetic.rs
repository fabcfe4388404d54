//! Synthetic checkpoints: the architecture and exact shapes of a real model with random weights
//! drawn from a seed, written as an ordinary model folder (config.json, model.safetensors,
//! tokenizer.json, the sentence-transformers modules). Benchmarks run on them where the real
//! weights cannot be downloaded; the vectors mean nothing, but computing them costs what the real
//! model costs (same layers, widths, vocabulary table and head).
//!
//! The tokenizer is a WordPiece vocabulary over the words of the load generator's texts
//! ([`crate::bench`]), three in ten of them split in two pieces, so its texts come out at about
//! 1.3 tokens per word, as with the real tokenizers; other words fall back to one token per
//! character. Token ids are spread over the whole vocabulary.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

/// The real models whose shapes can be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blueprint {
    /// Qwen/Qwen3-Embedding-0.6B: 28 layers, hidden 1024, last-token pooling, 1024-d.
    Qwen3Embedding06B,
    /// google/embeddinggemma-300m: 24 layers, hidden 768, mean pooling + Dense head, 768-d.
    EmbeddingGemma300M,
}

impl Blueprint {
    pub const ALL: [(&'static str, Blueprint); 2] =
        [("qwen3-embedding-0.6b", Blueprint::Qwen3Embedding06B), ("embeddinggemma-300m", Blueprint::EmbeddingGemma300M)];

    pub fn parse(name: &str) -> Option<Blueprint> {
        Blueprint::ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }
}

/// Stored precision of the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    F32,
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    pub parameters: u64,
    pub bytes: u64,
}

/// Writes the model folder `dir` (created if needed) for `blueprint` with weights from `seed`.
pub fn write(blueprint: Blueprint, dir: &Path, seed: u64, precision: Precision) -> std::io::Result<Written> {
    fs::create_dir_all(dir)?;
    let spec = Spec::of(blueprint);
    let mut rng = Normal::new(seed);
    json_file(&dir.join("config.json"), &spec.config)?;
    json_file(&dir.join("tokenizer.json"), &tokenizer(&spec, seed))?;
    // Makes transformers use tokenizer.json as it is (it would otherwise rebuild the tokenizer
    // class of the model type), so sentence-transformers reads the same folder the same way.
    let mut tokenizer_config = spec.tokenizer_config.clone();
    tokenizer_config["tokenizer_class"] = json!("TokenizersBackend");
    tokenizer_config["model_max_length"] = json!(spec.max_seq_length);
    json_file(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    json_file(&dir.join("sentence_bert_config.json"), &json!({"max_seq_length": spec.max_seq_length, "do_lower_case": false}))?;
    json_file(&dir.join("config_sentence_transformers.json"), &json!({"prompts": spec.prompts, "default_prompt_name": null, "similarity_fn_name": "cosine"}))?;
    let mut modules = vec![json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"})];
    modules.push(json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}));
    json_file(
        &dir.join("1_Pooling/config.json"),
        &json!({
            "word_embedding_dimension": spec.hidden,
            "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": !spec.last_token,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": spec.last_token,
            "include_prompt": true
        }),
    )?;
    let mut written = safetensors(&dir.join("model.safetensors"), &spec.tensors, precision, &mut rng)?;
    for (i, &(input, output)) in spec.dense.iter().enumerate() {
        let folder = format!("{}_Dense", i + 2);
        modules.push(json!({"idx": i + 2, "name": (i + 2).to_string(), "path": folder, "type": "sentence_transformers.models.Dense"}));
        json_file(
            &dir.join(&folder).join("config.json"),
            &json!({"in_features": input, "out_features": output, "bias": false, "activation_function": "torch.nn.modules.linear.Identity"}),
        )?;
        let head = vec![Tensor { name: "linear.weight".into(), shape: vec![output, input], init: Init::Normal }];
        let w = safetensors(&dir.join(&folder).join("model.safetensors"), &head, precision, &mut rng)?;
        written.parameters += w.parameters;
        written.bytes += w.bytes;
    }
    let n = modules.len();
    modules.push(json!({"idx": n, "name": n.to_string(), "path": format!("{n}_Normalize"), "type": "sentence_transformers.models.Normalize"}));
    json_file(&dir.join("modules.json"), &Value::Array(modules))?;
    Ok(written)
}

/// Writes the model folder `dir` for a real checkpoint's metadata in `source` (config.json and
/// the sentence-transformers files, no weights): every JSON file of `source` copied as it is, random
/// weights from `seed` of exactly the shapes its config.json and Dense configs declare, and a small
/// tokenizer with the special tokens of its architecture. What a user downloads, but for the
/// weights' values and the tokenizer's size.
pub fn write_from_config(source: &Path, dir: &Path, seed: u64, precision: Precision) -> std::io::Result<Written> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {m}", source.join("config.json").display()));
    let config: Value = serde_json::from_slice(&fs::read(source.join("config.json"))?).map_err(|e| invalid(e.to_string()))?;
    let int = |key: &str| config.get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| invalid(format!("`{key}` missing or not a count")));
    let (base, norms, norm_init, default_head_dim): (_, &[&str], _, _) = match config.get("model_type").and_then(Value::as_str) {
        Some("qwen3") => (Blueprint::Qwen3Embedding06B, &QWEN3_NORMS, 1.0, None),
        Some("gemma3_text") => (
            Blueprint::EmbeddingGemma300M,
            &GEMMA3_NORMS,
            0.0,
            Some(256),
        ),
        other => return Err(invalid(format!("model_type {other:?}: synth writes qwen3 and gemma3_text"))),
    };
    if config.get("quantization").is_some_and(|q| !q.is_null()) {
        return Err(invalid("quantized checkpoints are not written by synth (only f32/bf16 weights)".into()));
    }
    let (hidden, layers, heads, kv, inter, vocab) = (int("hidden_size")?, int("num_hidden_layers")?,
        int("num_attention_heads")?, int("num_key_value_heads")?, int("intermediate_size")?, int("vocab_size")?);
    let head_dim = match config.get("head_dim").filter(|v| !v.is_null()) {
        Some(_) => int("head_dim")?,
        None => default_head_dim.unwrap_or(hidden / heads.max(1)),
    };
    let mut tensors = decoder_tensors(hidden, layers, heads, kv, head_dim, inter, vocab, norms, norm_init);
    tensors.push(Tensor { name: "norm.weight".into(), shape: vec![hidden], init: Init::Constant(norm_init) });
    let spec = Spec { config, hidden, vocab, tensors, ..Spec::of(base) };
    if let Some((token, id)) = spec.specials.iter().find(|(_, id)| *id >= vocab) {
        return Err(invalid(format!("vocab_size {vocab} leaves no room for `{token}` (id {id})")));
    }

    fs::create_dir_all(dir)?;
    copy_json_files(source, dir)?;
    json_file(&dir.join("tokenizer.json"), &tokenizer(&spec, seed))?;
    if !dir.join("tokenizer_config.json").exists() {
        json_file(&dir.join("tokenizer_config.json"), &spec.tokenizer_config)?;
    }
    let mut rng = Normal::new(seed);
    let mut written = safetensors(&dir.join("model.safetensors"), &spec.tensors, precision, &mut rng)?;
    // Dense modules: every folder whose config.json declares a linear layer.
    let mut folders: Vec<_> = fs::read_dir(source)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    folders.sort();
    for folder in folders {
        let Ok(text) = fs::read(folder.join("config.json")) else { continue };
        let dense: Value = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        let (Some(input), Some(output)) = (dense.get("in_features").and_then(Value::as_u64), dense.get("out_features").and_then(Value::as_u64)) else {
            continue;
        };
        let (input, output) = (input as usize, output as usize);
        let mut head = vec![Tensor { name: "linear.weight".into(), shape: vec![output, input], init: Init::Normal }];
        if dense.get("bias").and_then(Value::as_bool).unwrap_or(true) {
            head.push(Tensor { name: "linear.bias".into(), shape: vec![output], init: Init::Normal });
        }
        let out = dir.join(folder.file_name().expect("a folder read from a directory has a name"));
        let w = safetensors(&out.join("model.safetensors"), &head, precision, &mut rng)?;
        written.parameters += w.parameters;
        written.bytes += w.bytes;
    }
    Ok(written)
}

/// Copies the JSON files of `from` and of its sub-folders, byte for byte.
fn copy_json_files(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let path = entry?.path();
        let dst = to.join(path.file_name().expect("a path read from a directory has a name"));
        if path.is_dir() {
            fs::create_dir_all(&dst)?;
            copy_json_files(&path, &dst)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            fs::copy(&path, &dst)?;
        }
    }
    Ok(())
}

/// The tokenizer.json that [`write`] puts in the folder.
pub fn tokenizer_json(blueprint: Blueprint, seed: u64) -> String {
    serde_json::to_string(&tokenizer(&Spec::of(blueprint), seed)).expect("JSON values serialize")
}

enum Init {
    Normal,
    /// Norm weights: ones for `w·x` norms, zeros for Gemma's `(1 + w)·x`.
    Constant(f32),
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

struct Spec {
    config: Value,
    hidden: usize,
    vocab: usize,
    tensors: Vec<Tensor>,
    dense: Vec<(usize, usize)>,
    last_token: bool,
    max_seq_length: usize,
    prompts: Value,
    /// (token, id) of the special tokens, and the template around a text.
    specials: Vec<(&'static str, usize)>,
    template: (&'static [&'static str], &'static [&'static str]),
    unk: &'static str,
    /// Special tokens and padding side as transformers' tokenizer_config.json has them.
    tokenizer_config: Value,
}

impl Spec {
    fn of(blueprint: Blueprint) -> Spec {
        match blueprint {
            Blueprint::Qwen3Embedding06B => {
                let (hidden, layers, heads, kv, head_dim, inter, vocab) = (1024, 28, 16, 8, 128, 3072, 151_669);
                let config = json!({
                    "architectures": ["Qwen3Model"], "model_type": "qwen3", "attention_bias": false,
                    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "dtype": "bfloat16",
                    "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
                    "intermediate_size": inter, "layer_types": vec!["full_attention"; layers],
                    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": heads,
                    "num_hidden_layers": layers, "num_key_value_heads": kv, "pad_token_id": null, "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"}, "sliding_window": null,
                    "tie_word_embeddings": true, "use_cache": true, "use_sliding_window": false, "vocab_size": vocab
                });
                let mut tensors = decoder_tensors(hidden, layers, heads, kv, head_dim, inter, vocab, &QWEN3_NORMS, 1.0);
                tensors.push(Tensor { name: "norm.weight".into(), shape: vec![hidden], init: Init::Constant(1.0) });
                Spec {
                    config,
                    hidden,
                    vocab,
                    tensors,
                    dense: vec![],
                    last_token: true,
                    max_seq_length: 8192,
                    prompts: json!({
                        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
                        "document": ""
                    }),
                    specials: vec![("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645), ("[UNK]", 151646)],
                    template: (&[], &["<|endoftext|>"]),
                    unk: "[UNK]",
                    tokenizer_config: json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "[UNK]", "padding_side": "left"}),
                }
            }
            Blueprint::EmbeddingGemma300M => {
                let (hidden, layers, heads, kv, head_dim, inter, vocab) = (768, 24, 3, 1, 256, 1152, 262_144);
                let layer_types: Vec<&str> =
                    (0..layers).map(|i| if i % 6 == 5 { "full_attention" } else { "sliding_attention" }).collect();
                let config = json!({
                    "architectures": ["Gemma3TextModel"], "model_type": "gemma3_text", "_sliding_window_pattern": 6,
                    "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null,
                    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "float32",
                    "final_logit_softcapping": null, "head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh",
                    "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": inter,
                    "layer_types": layer_types, "max_position_embeddings": 2048, "num_attention_heads": heads,
                    "num_hidden_layers": layers, "num_key_value_heads": kv, "query_pre_attn_scalar": 256,
                    "rms_norm_eps": 1e-6,
                    "rope_parameters": {
                        "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
                        "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}
                    },
                    "sliding_window": 512, "tie_word_embeddings": true, "use_bidirectional_attention": true,
                    "use_cache": true, "vocab_size": vocab
                });
                let mut tensors = decoder_tensors(hidden, layers, heads, kv, head_dim, inter, vocab, &GEMMA3_NORMS, 0.0);
                tensors.push(Tensor { name: "norm.weight".into(), shape: vec![hidden], init: Init::Constant(0.0) });
                Spec {
                    config,
                    hidden,
                    vocab,
                    tensors,
                    dense: vec![(768, 3072), (3072, 768)],
                    last_token: false,
                    max_seq_length: 2048,
                    prompts: json!({
                        "query": "task: search result | query: ",
                        "document": "title: none | text: ",
                        "Clustering": "task: clustering | query: ",
                        "Classification": "task: classification | query: ",
                        "STS": "task: sentence similarity | query: ",
                        "InstructionRetrieval": "task: code retrieval | query: ",
                        "Summarization": "task: summarization | query: "
                    }),
                    specials: vec![("<pad>", 0), ("<eos>", 1), ("<bos>", 2), ("<unk>", 3)],
                    template: (&["<bos>"], &["<eos>"]),
                    unk: "<unk>",
                    tokenizer_config: json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "right"}),
                }
            }
        }
    }
}

/// The per-layer norms of each architecture (Qwen3's multiply by w, Gemma's by 1 + w).
const QWEN3_NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];
const GEMMA3_NORMS: [&str; 4] = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"];

/// The tensors of a decoder stack in Hugging Face naming (without the `model.` prefix).
#[allow(clippy::too_many_arguments)]
fn decoder_tensors(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
    norms: &[&str],
    norm_init: f32,
) -> Vec<Tensor> {
    let t = |name: String, shape: Vec<usize>, init: Init| Tensor { name, shape, init };
    let mut out = vec![t("embed_tokens.weight".into(), vec![vocab, hidden], Init::Normal)];
    for i in 0..layers {
        let p = format!("layers.{i}");
        for norm in norms {
            out.push(t(format!("{p}.{norm}.weight"), vec![hidden], Init::Constant(norm_init)));
        }
        out.push(t(format!("{p}.self_attn.q_proj.weight"), vec![heads * head_dim, hidden], Init::Normal));
        out.push(t(format!("{p}.self_attn.k_proj.weight"), vec![kv * head_dim, hidden], Init::Normal));
        out.push(t(format!("{p}.self_attn.v_proj.weight"), vec![kv * head_dim, hidden], Init::Normal));
        out.push(t(format!("{p}.self_attn.o_proj.weight"), vec![hidden, heads * head_dim], Init::Normal));
        out.push(t(format!("{p}.self_attn.q_norm.weight"), vec![head_dim], Init::Constant(norm_init)));
        out.push(t(format!("{p}.self_attn.k_norm.weight"), vec![head_dim], Init::Constant(norm_init)));
        out.push(t(format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden], Init::Normal));
        out.push(t(format!("{p}.mlp.up_proj.weight"), vec![inter, hidden], Init::Normal));
        out.push(t(format!("{p}.mlp.down_proj.weight"), vec![hidden, inter], Init::Normal));
    }
    out
}

/// A WordPiece tokenizer: the load generator's words (three in ten split in two pieces), single
/// characters as a fallback, the model's special tokens and its template around each text.
fn tokenizer(spec: &Spec, seed: u64) -> Value {
    let mut pieces: Vec<String> = Vec::new();
    for (i, word) in crate::bench::WORDS.iter().enumerate() {
        if i % 10 < 3 && word.len() > 3 {
            let cut = word.len() / 2;
            pieces.push(word[..cut].to_string());
            pieces.push(format!("##{}", &word[cut..]));
        } else {
            pieces.push(word.to_string());
        }
    }
    for c in (0x21u8..0x7f).map(char::from) {
        pieces.push(c.to_string());
        pieces.push(format!("##{c}"));
    }
    // Ids spread over the whole table (outside the special tokens), chosen by the seed.
    let taken: Vec<usize> = spec.specials.iter().map(|(_, id)| *id).collect();
    let mut rng = Normal::new(seed ^ 0x70_6b_65_6e);
    let mut vocab: BTreeMap<String, usize> = spec.specials.iter().map(|(t, id)| (t.to_string(), *id)).collect();
    let mut used: std::collections::HashSet<usize> = taken.into_iter().collect();
    for piece in pieces {
        if vocab.contains_key(&piece) {
            continue;
        }
        let mut id = (rng.next_u64() % spec.vocab as u64) as usize;
        while used.contains(&id) {
            id = (id + 1) % spec.vocab;
        }
        used.insert(id);
        vocab.insert(piece, id);
    }
    let special = |token: &str| json!({"SpecialToken": {"id": token, "type_id": 0}});
    let (before, after) = spec.template;
    let mut single: Vec<Value> = before.iter().map(|t| special(t)).collect();
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    single.extend(after.iter().map(|t| special(t)));
    let template_tokens: BTreeMap<&str, Value> = before
        .iter()
        .chain(after.iter())
        .map(|t| (*t, json!({"id": t, "ids": [vocab[*t]], "tokens": [t]})))
        .collect();
    let added: Vec<Value> = spec
        .specials
        .iter()
        .map(|(t, id)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing", "single": single.clone(), "pair": single, "special_tokens": template_tokens},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": spec.unk, "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

fn json_file(path: &Path, value: &Value) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, serde_json::to_vec_pretty(value).expect("JSON values serialize"))
}

/// Writes `tensors` as one safetensors file, values drawn from `rng` as they are written.
fn safetensors(path: &Path, tensors: &[Tensor], precision: Precision, rng: &mut Normal) -> std::io::Result<Written> {
    let (dtype, size) = match precision {
        Precision::Bf16 => ("BF16", 2),
        Precision::F32 => ("F32", 4),
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut parameters = 0u64;
    for t in tensors {
        let n: usize = t.shape.iter().product();
        header.insert(t.name.clone(), json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + n * size]}));
        offset += n * size;
        parameters += n as u64;
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).expect("JSON values serialize");
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = BufWriter::with_capacity(1 << 22, fs::File::create(path)?);
    out.write_all(&(head.len() as u64).to_le_bytes())?;
    out.write_all(&head)?;
    let mut buf = Vec::with_capacity(1 << 20);
    for t in tensors {
        let mut left: usize = t.shape.iter().product();
        while left > 0 {
            let n = left.min(1 << 18);
            buf.clear();
            for _ in 0..n {
                let v = match t.init {
                    Init::Normal => 0.02 * rng.sample(),
                    Init::Constant(c) => c,
                };
                match precision {
                    Precision::Bf16 => buf.extend_from_slice(&bf16_bits(v).to_le_bytes()),
                    Precision::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                }
            }
            out.write_all(&buf)?;
            left -= n;
        }
    }
    out.flush()?;
    Ok(Written { parameters, bytes: 8 + head.len() as u64 + offset as u64 })
}

/// f32 → bf16, rounding to nearest even (values here are finite).
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Approximately standard normal values (sum of four uniforms, centred and scaled) from the load
/// generator's [`Rng`](crate::bench::Rng): cheap enough for a billion draws, and the same for the
/// same seed.
struct Normal(crate::bench::Rng);

impl Normal {
    fn new(seed: u64) -> Normal {
        Normal(crate::bench::Rng::new(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next()
    }

    fn sample(&mut self) -> f32 {
        let r = self.next_u64();
        let sum: u32 = (0..4).map(|k| ((r >> (16 * k)) & 0xffff) as u32).sum();
        // Four uniforms on [0, 1): mean 2, variance 4/12.
        ((sum as f32 / 65536.0) - 2.0) * (3.0f32).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_add_up_to_the_real_parameter_counts() {
        let count = |b| Spec::of(b).tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum::<usize>();
        // Qwen3-Embedding-0.6B: 595.8M parameters (tied embeddings); EmbeddingGemma-300m's
        // transformer: 302.9M, plus its Dense head's 2 × 768 × 3072.
        assert_eq!(count(Blueprint::Qwen3Embedding06B), 595_776_512);
        assert_eq!(count(Blueprint::EmbeddingGemma300M), 302_863_104);
    }

    #[test]
    fn the_same_seed_writes_the_same_weights_and_another_seed_others() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = || vec![Tensor { name: "a".into(), shape: vec![64, 32], init: Init::Normal }, Tensor { name: "n".into(), shape: vec![32], init: Init::Constant(1.0) }];
        let file = |name: &str, seed| {
            let path = dir.path().join(name);
            safetensors(&path, &tensors(), Precision::Bf16, &mut Normal::new(seed)).unwrap();
            std::fs::read(path).unwrap()
        };
        let (a, b, c) = (file("a", 1), file("b", 1), file("c", 2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Header, then 64 × 32 + 32 bf16 values; the norm's ones at the end.
        assert_eq!(a.len() as u64, 8 + u64::from_le_bytes(a[..8].try_into().unwrap()) + (64 * 32 + 32) * 2);
        assert!(a[a.len() - 64..].chunks(2).all(|v| v == [0x80, 0x3f]));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    }

    #[test]
    fn the_normal_draws_have_mean_zero_and_unit_variance_and_repeat_per_seed() {
        let mut a = Normal::new(7);
        let xs: Vec<f32> = (0..200_000).map(|_| a.sample()).collect();
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "{mean} {var}");
        let mut b = Normal::new(7);
        assert_eq!(b.sample(), xs[0]);
    }
}
