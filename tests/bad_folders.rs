//! Broken model folders are refused with an error that names the file and the field or tensor at
//! fault — never a crash; a checkpoint holding more than its config describes loads with a
//! warning naming what was left unread. Each test breaks one thing in a scratch copy of a fixture.

mod common;

use std::path::Path;

use common::*;
use mlx_embed::mlx::Dtype;
use mlx_embed::models::{EmbeddingModel, LoadOptions};

fn load_err(dir: &Path) -> String {
    let _g = mlx_lock();
    match EmbeddingModel::load(dir, LoadOptions { dtype: Some(Dtype::Float32), ..Default::default() }) {
        Ok(_) => panic!("{} loaded but should have been refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} does not mention {p:?}");
    }
}

#[test]
fn a_missing_config_is_named() {
    let d = scratch_copy("qwen3-tiny");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert_mentions(&load_err(d.path()), &["config.json", "missing"]);
}

#[test]
fn a_missing_tokenizer_is_named() {
    let d = scratch_copy("qwen3-tiny");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    assert_mentions(&load_err(d.path()), &["tokenizer.json", "missing"]);
}

#[test]
fn missing_weights_are_named() {
    let d = scratch_copy("qwen3-tiny");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert_mentions(&load_err(d.path()), &["model.safetensors", "missing"]);
}

#[test]
fn a_shard_named_by_the_index_but_absent_is_named() {
    let d = scratch_copy("qwen3-tiny-q4");
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_mentions(&load_err(d.path()), &["model-00002-of-00002.safetensors", "missing"]);
}

#[test]
fn a_truncated_weights_file_is_an_error_not_a_crash() {
    let d = scratch_copy("qwen3-tiny");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&load_err(d.path()), &["model.safetensors"]);
}

#[test]
fn an_unknown_model_type_is_named() {
    let d = scratch_copy("qwen3-tiny");
    edit_json(&d.path().join("config.json"), |c| c["model_type"] = "bert".into());
    assert_mentions(&load_err(d.path()), &["config.json", "model_type", "bert"]);
}

#[test]
fn broken_json_names_the_file() {
    let d = scratch_copy("gemma-tiny");
    std::fs::write(d.path().join("config.json"), "{\"model_type\": ").unwrap();
    assert_mentions(&load_err(d.path()), &["config.json", "invalid JSON"]);
}

#[test]
fn a_wrongly_typed_config_field_is_named() {
    let d = scratch_copy("qwen3-tiny");
    edit_json(&d.path().join("config.json"), |c| c["num_hidden_layers"] = "three".into());
    assert_mentions(&load_err(d.path()), &["config.json", "num_hidden_layers"]);
}

#[test]
fn a_shape_that_does_not_match_the_config_names_the_tensor() {
    let d = scratch_copy("qwen3-tiny");
    edit_json(&d.path().join("config.json"), |c| {
        let i = c["intermediate_size"].as_i64().unwrap();
        c["intermediate_size"] = (i + 8).into();
    });
    assert_mentions(&load_err(d.path()), &["model.safetensors", "layers.0.mlp.gate_proj.weight", "shape"]);
}

#[test]
fn an_unsupported_weight_dtype_names_the_tensor() {
    let d = scratch_copy("gemma-tiny");
    edit_safetensors_header(&d.path().join("model.safetensors"), |h| h["norm.weight"]["dtype"] = "I32".into());
    assert_mentions(&load_err(d.path()), &["model.safetensors", "norm.weight", "int32"]);
}

#[test]
fn unsupported_quantization_bits_are_named() {
    let d = scratch_copy("qwen3-tiny-q4");
    edit_json(&d.path().join("config.json"), |c| c["quantization"]["bits"] = 7.into());
    assert_mentions(&load_err(d.path()), &["config.json", "quantization.bits", "7"]);
}

#[test]
fn an_unsupported_quantization_mode_is_named() {
    let d = scratch_copy("qwen3-tiny-q4");
    edit_json(&d.path().join("config.json"), |c| c["quantization"]["mode"] = "mxfp4".into());
    assert_mentions(&load_err(d.path()), &["config.json", "quantization.mode", "mxfp4"]);
}

#[test]
fn quantized_weights_without_a_quantization_block_are_refused() {
    let d = scratch_copy("qwen3-tiny-q4");
    edit_json(&d.path().join("config.json"), |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("quantization");
        o.remove("quantization_config");
    });
    assert_mentions(&load_err(d.path()), &["config.json", "quantization", "missing"]);
}

#[test]
fn embeddinggemma_without_its_head_says_what_is_missing() {
    let d = scratch_copy("gemma-tiny");
    std::fs::remove_file(d.path().join("modules.json")).unwrap();
    assert_mentions(&load_err(d.path()), &["modules.json", "2_Dense", "3_Dense"]);
}

#[test]
fn a_dense_module_without_weights_is_named() {
    let d = scratch_copy("gemma-tiny");
    std::fs::remove_file(d.path().join("2_Dense/model.safetensors")).unwrap();
    assert_mentions(&load_err(d.path()), &["2_Dense/model.safetensors", "missing"]);
}

#[test]
fn layer_types_of_the_wrong_length_are_named() {
    let d = scratch_copy("gemma-tiny");
    edit_json(&d.path().join("config.json"), |c| {
        c["layer_types"].as_array_mut().unwrap().pop();
    });
    assert_mentions(&load_err(d.path()), &["config.json", "layer_types"]);
}

#[test]
fn an_unknown_pooling_mode_is_named() {
    let d = scratch_copy("gemma-tiny");
    edit_json(&d.path().join("1_Pooling/config.json"), |c| {
        c["pooling_mode_mean_tokens"] = false.into();
        c["pooling_mode_max_tokens"] = true.into();
    });
    assert_mentions(&load_err(d.path()), &["1_Pooling/config.json", "pooling_mode_max_tokens"]);
}

#[test]
fn a_config_vocabulary_that_does_not_match_the_embedding_table_is_refused() {
    let d = scratch_copy("qwen3-tiny");
    edit_json(&d.path().join("config.json"), |c| c["vocab_size"] = 16.into());
    assert_mentions(&load_err(d.path()), &["model.safetensors", "embed_tokens.weight", "[16, 64]"]);
}

/// As in the real EmbeddingGemma-300m: its tokenizer lists `<image_soft_token>` at id 262144, one
/// past its 262,144-row table. The model loads; only a text holding that token is refused.
#[test]
fn a_tokenizer_with_added_tokens_past_the_table_loads_and_refuses_only_texts_that_hold_them() {
    let d = scratch_copy("gemma-tiny");
    let rows = {
        let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap()).unwrap();
        c["vocab_size"].as_u64().unwrap()
    };
    edit_json(&d.path().join("tokenizer.json"), |t| {
        t["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": rows, "content": "<image_soft_token>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}));
    });
    let _g = mlx_lock();
    let model = EmbeddingModel::load(d.path(), LoadOptions { dtype: Some(Dtype::Float32), ..Default::default() })
        .unwrap_or_else(|e| panic!("refused: {e}"));
    let pre = model.preprocessor();
    let err = pre.tokenize("", "a <image_soft_token> b", None, mlx_embed::tokenize::Truncation::Right).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("<image_soft_token>") && text.contains(&format!("id {rows}")), "{text}");
    assert!(matches!(err, mlx_embed::error::Error::InvalidArgument { .. }), "{err:?}");
    // Ids that did not come through the tokenizer are checked before the gather too.
    let past = [2u32, rows as u32, 1];
    let err = model.embed_ids(&[&[2, 5, 1], &past]).unwrap_err().to_string();
    assert!(err.contains("items[1]") && err.contains(&rows.to_string()), "{err}");
    let ok = pre.tokenize("", "a b", None, mlx_embed::tokenize::Truncation::Right).unwrap();
    assert_eq!(model.embed_ids(&[&ok.ids]).unwrap().len(), 1);
}

#[test]
fn a_folder_that_does_not_exist_is_named() {
    assert_mentions(&load_err(Path::new("/nonexistent/model")), &["/nonexistent/model"]);
}

/// The WARN lines `mlx-embed embed` logs while loading `dir` (as JSON objects), and whether the
/// load succeeded.
fn load_warnings(dir: &Path) -> (bool, Vec<serde_json::Value>) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
        .args(["--log-format", "json", "embed", "--dtype", "f32", "--device", "cpu", "--model-dir"]).arg(dir).arg("hello")
        .env("RUST_LOG", "warn")
        .output().unwrap();
    let warnings = String::from_utf8_lossy(&out.stderr).lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "WARN")
        .collect();
    (out.status.success(), warnings)
}

/// A config.json declaring fewer layers than the checkpoint holds still loads (transformers only
/// warns about unexpected keys too), but with a warning that names the tensors nothing read and
/// counts them. Tensors a checkpoint carries for other uses (a causal LM's `lm_head`, saved RoPE
/// frequencies) are not warned about.
#[test]
fn a_config_with_fewer_layers_than_the_checkpoint_loads_with_a_warning_naming_the_unread_tensors() {
    for fixture in fixtures() {
        let (loaded, warnings) = load_warnings(&fixture);
        assert!(loaded && warnings.is_empty(), "{}: {warnings:?}", fixture.display());
    }

    let d = scratch_copy("qwen3-tiny");
    edit_json(&d.path().join("config.json"), |c| c["num_hidden_layers"] = 2.into());
    edit_safetensors_header(&d.path().join("model.safetensors"), |h| {
        let h = h.as_object_mut().unwrap();
        for (from, to) in [("layers.2.mlp.down_proj.weight", "lm_head.weight"), ("layers.2.mlp.up_proj.weight", "layers.0.self_attn.rotary_emb.inv_freq")] {
            let entry = h.remove(from).unwrap();
            h.insert(to.into(), entry);
        }
    });
    let (loaded, warnings) = load_warnings(d.path());
    assert!(loaded, "a checkpoint with more layers than its config must still load");
    let text = serde_json::to_string(&warnings).unwrap();
    assert_eq!(warnings.len(), 1, "{text}");
    for part in ["layers.2.input_layernorm.weight", "model.safetensors", "config.json"] {
        assert!(text.contains(part), "the warning lacks {part:?}: {text}");
    }
    assert_eq!(warnings[0]["fields"]["unread"], 9, "{text}");
    assert!(!text.contains("lm_head") && !text.contains("inv_freq"), "{text}");
}
