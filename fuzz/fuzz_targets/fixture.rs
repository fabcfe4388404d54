//! The fixture models' text side (tokenizer, prompts, sizes), loaded once per process.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use mlx_embed::config::{Config, ModelConfig};
use mlx_embed::models::{EmbeddingModel, LoadOptions, Preprocessor};

#[allow(dead_code)] // each target uses part of it
pub struct Fixture {
    pub pre: Arc<Preprocessor>,
    pub cfg: ModelConfig,
}

/// `qwen3-tiny` (a BPE tokenizer that appends `<|endoftext|>`) and `gemma-tiny` (a SentencePiece
/// tokenizer with `<bos>`/`<eos>`), with a config like a deployment's: Matryoshka sizes,
/// a token limit and a default truncation.
pub fn fixtures() -> &'static [Fixture] {
    static FIXTURES: OnceLock<Vec<Fixture>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let config = Config::parse(Path::new("fuzz.yaml"), "
models:
  - {name: qwen, source: qwen3-tiny, max_tokens: 24, truncation: start}
  - {name: gemma, source: gemma-tiny, allowed_dimensions: [48, 32], default_prompt: query}
").unwrap();
        config.models.into_iter().map(|cfg| {
            let model = EmbeddingModel::load(&dir.join(&cfg.source), LoadOptions { dtype: None, gpu: false }).unwrap();
            let pre = model.preprocessor();
            // The weights are not needed; MLX state stays on this thread, untouched.
            std::mem::forget(model);
            Fixture { pre, cfg }
        }).collect()
    })
}
