//! Every real checkpoint's metadata in `tests/fixtures/real-configs/` (verbatim copies of what the
//! hub serves; each folder's SOURCE.md says where from) loads: `synth --from-config` writes random
//! weights of exactly the shapes those files declare next to them, with a small tokenizer, and the
//! model must load, describe itself as its files say, and embed.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mlx_embed::mlx::Dtype;
use mlx_embed::models::{EmbeddingModel, LoadOptions, PromptChoice};
use mlx_embed::synthetic::{write_from_config, Precision};
use serde_json::Value;

fn real_configs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir().join("real-configs")).unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn json(path: &Path) -> Option<Value> {
    std::fs::read_to_string(path).ok().map(|t| serde_json::from_str(&t).unwrap())
}

#[test]
fn the_checkpoints_users_pull_are_all_there() {
    let names: Vec<String> = real_configs().iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["Qwen__Qwen3-Embedding-0.6B", "google__embeddinggemma-300m"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    for dir in real_configs() {
        assert!(dir.join("SOURCE.md").is_file(), "{}: no SOURCE.md saying where the files come from", dir.display());
    }
}

#[test]
fn every_real_config_loads_with_weights_of_its_shapes_and_embeds() {
    for source in real_configs() {
        let name = source.file_name().unwrap().to_string_lossy().into_owned();
        let out = tempfile::tempdir().unwrap();
        let written = write_from_config(&source, out.path(), 1, Precision::Bf16).unwrap_or_else(|e| panic!("{name}: {e}"));
        let config = json(&source.join("config.json")).unwrap();
        let _g = mlx_lock();
        let model = EmbeddingModel::load(out.path(), LoadOptions { dtype: Some(Dtype::Float32), ..Default::default() })
            .unwrap_or_else(|e| panic!("{name} was refused: {e}"));
        let info = model.info();

        // What the model says it is comes from its own files.
        assert_eq!(info.architecture.model_type(), config["model_type"].as_str().unwrap(), "{name}");
        assert_eq!(info.hidden_size as u64, config["hidden_size"].as_u64().unwrap(), "{name}");
        let dense_out = ["3_Dense", "2_Dense"].iter().find_map(|d| json(&source.join(d).join("config.json")))
            .map(|d| d["out_features"].as_u64().unwrap());
        assert_eq!(info.dimensions as u64, dense_out.unwrap_or(info.hidden_size as u64), "{name}");
        let positions = config["max_position_embeddings"].as_u64().unwrap();
        let sbert = json(&source.join("sentence_bert_config.json")).and_then(|s| s["max_seq_length"].as_u64());
        assert_eq!(info.max_tokens as u64, sbert.map_or(positions, |s| s.min(positions)), "{name}");
        if let Some(st) = json(&source.join("config_sentence_transformers.json")) {
            for (prompt, text) in st["prompts"].as_object().unwrap() {
                assert_eq!(info.prompts.get(prompt).map(String::as_str), text.as_str(), "{name}: prompt {prompt}");
            }
        }
        let pooling = json(&source.join("1_Pooling/config.json")).unwrap();
        let want_pooling = if pooling["pooling_mode_lasttoken"] == true { "last_token" } else { "mean" };
        assert_eq!(info.pooling.name(), want_pooling, "{name}");

        // Full-size weights (the loader checks each tensor's shape against the config).
        assert!(written.parameters > 100_000_000, "{name}: {} parameters", written.parameters);
        let v = model.embed_texts(&["vector search index".to_string()], &PromptChoice::Name("query".into()), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v[0].len(), info.dimensions as usize, "{name}");
        let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(v[0].iter().all(|x| x.is_finite()) && (norm - 1.0).abs() < 1e-3, "{name}: norm {norm}");
    }
}

#[test]
fn synth_from_config_copies_the_metadata_byte_for_byte() {
    let source = fixtures_dir().join("real-configs/google__embeddinggemma-300m");
    let out = tempfile::tempdir().unwrap();
    write_from_config(&source, out.path(), 1, Precision::Bf16).unwrap();
    for f in ["config.json", "modules.json", "1_Pooling/config.json", "2_Dense/config.json", "3_Dense/config.json",
        "config_sentence_transformers.json", "sentence_bert_config.json"] {
        assert_eq!(std::fs::read(source.join(f)).unwrap(), std::fs::read(out.path().join(f)).unwrap(), "{f}");
    }
}
