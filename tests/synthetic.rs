//! Synthetic checkpoints (`mlx-embed synth`): an EmbeddingGemma-300m-shaped folder loads and
//! embeds through the normal path (768-d unit vectors from the Dense head); the tokenizers give
//! the load generator's texts about 1.3 tokens per word with each model's special tokens.

use std::process::Command;

use mlx_embed::synthetic::{tokenizer_json, Blueprint};

#[test]
fn an_embeddinggemma_shaped_checkpoint_loads_and_gives_unit_vectors_of_768() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gemma");
    let bin = env!("CARGO_BIN_EXE_mlx-embed");
    let synth = Command::new(bin).args(["synth", "--model", "embeddinggemma-300m", "--seed", "5", "--dtype", "bf16", "--out"]).arg(&out).output().unwrap();
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    assert!(String::from_utf8_lossy(&synth.stderr).contains("307581696 parameters"), "{}", String::from_utf8_lossy(&synth.stderr));

    let embed = Command::new(bin)
        .args(["embed", "--device", "cpu", "--dtype", "f32", "--prompt-name", "query", "--model-dir"])
        .arg(&out)
        .args(["vector search engine", "cosine distance of exact vectors"])
        .output()
        .unwrap();
    assert!(embed.status.success(), "{}", String::from_utf8_lossy(&embed.stderr));
    let json: serde_json::Value = serde_json::from_slice(&embed.stdout).unwrap();
    assert_eq!(json["dimensions"], 768);
    let vectors: Vec<Vec<f64>> = serde_json::from_value(json["embeddings"].clone()).unwrap();
    assert_eq!(vectors.len(), 2);
    for v in &vectors {
        assert_eq!(v.len(), 768);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
    assert_ne!(vectors[0], vectors[1]);
}

#[test]
fn the_tokenizers_give_about_1_3_tokens_per_word_with_the_models_special_tokens() {
    let mut rng = mlx_embed::bench::Rng::new(9);
    let text = mlx_embed::bench::text(&mut rng, 2000);
    for (blueprint, first, last) in [(Blueprint::Qwen3Embedding06B, None, 151643), (Blueprint::EmbeddingGemma300M, Some(2), 1)] {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json(blueprint, 1)).unwrap();
        let ids = tokenizer.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        let per_word = (ids.len() - 1 - first.is_some() as usize) as f64 / 2000.0;
        assert!((1.2..1.45).contains(&per_word), "{blueprint:?}: {per_word} tokens per word");
        assert_eq!(*ids.last().unwrap(), last, "{blueprint:?}");
        if let Some(bos) = first {
            assert_eq!(ids[0], bos);
        }
        // Unknown words fall back to characters, never to the unknown token.
        let odd = tokenizer.encode("zyxq", false).unwrap();
        assert_eq!(odd.get_ids().len(), 4, "{blueprint:?}");
    }
}
