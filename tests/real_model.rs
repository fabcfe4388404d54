//! The real google/embeddinggemma-300m, as users download it, against sentence-transformers.
//!
//! The model folder comes from `scripts/fetch-embeddinggemma.py` (run by `make test`; verified
//! against the hub's sha256) and lives in a cache outside the clone. The reference vectors in
//! `tests/fixtures/real/embeddinggemma-300m.json` were computed from the same files by the pinned
//! sentence-transformers in f32 on the CPU (`scripts/gen_real_reference.py`).
//!
//! `MLX_EMBED_EMBEDDINGGEMMA` names the folder; by default it is `embeddinggemma-300m` under
//! `$MLX_EMBED_CACHE` (else `~/.cache/mlx-embed`). A missing folder fails the tests: CI must run
//! them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mlx_embed::mlx::Dtype;
use mlx_embed::models::{EmbeddingModel, LoadOptions, PromptChoice};
use mlx_embed::tokenize::Truncation;
use serde::Deserialize;

#[derive(Deserialize)]
struct RealReference {
    sha256: std::collections::BTreeMap<String, String>,
    cases: Vec<Case>,
}

fn reference() -> RealReference {
    let path = fixtures_dir().join("real/embeddinggemma-300m.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn model_dir() -> PathBuf {
    let dir = match std::env::var_os("MLX_EMBED_EMBEDDINGGEMMA") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("MLX_EMBED_CACHE").map(PathBuf::from).unwrap_or_else(|| {
                let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
                base.join("mlx-embed")
            });
            cache.join("embeddinggemma-300m")
        }
    };
    assert!(dir.join(".verified").is_file(),
        "{}: the real EmbeddingGemma-300m is not there; run scripts/fetch-embeddinggemma.py (make test does)", dir.display());
    dir
}

fn load(dtype: Dtype) -> EmbeddingModel {
    EmbeddingModel::load(&model_dir(), LoadOptions { dtype: Some(dtype), gpu: gpu(), ..Default::default() })
        .unwrap_or_else(|e| panic!("the real EmbeddingGemma-300m was refused: {e}"))
}

fn prompt(case: &Case) -> PromptChoice {
    case.prompt_name.clone().map_or(PromptChoice::None, PromptChoice::Name)
}

/// Token ids of a case's texts as the service makes them (the model's limit, end cut).
fn ids(model: &EmbeddingModel, case: &Case) -> Vec<Vec<u32>> {
    let pre = model.preprocessor();
    let prompt = pre.prompt(&prompt(case)).unwrap();
    assert_eq!(prompt, case.prompt, "{}: the prompt", case.name);
    case.texts.iter().map(|t| pre.tokenize(&prompt, t, None, Truncation::Right).unwrap().ids).collect()
}

fn finish_all(model: &EmbeddingModel, case: &Case, raw: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    let dims = case.dimensions.unwrap_or(model.info().dimensions) as usize;
    raw.into_iter().map(|v| mlx_embed::models::finish(v, dims, true)).collect()
}

/// The cases whose texts all have fewer than `max_tokens` tokens, each text alone: the tokens
/// sentence-transformers saw, and vectors at cosine ≥ `min_cos` to its vectors. Returns the cases
/// checked and their vectors.
fn check_alone(model: &EmbeddingModel, min_cos: f64, max_tokens: usize) -> Vec<(Case, Vec<Vec<f32>>)> {
    let mut all = vec![];
    for case in reference().cases.into_iter().filter(|c| c.token_ids.iter().all(|t| t.len() < max_tokens)) {
        let ids = ids(model, &case);
        assert_eq!(ids, case.token_ids, "{}: token ids differ from sentence-transformers'", case.name);
        let raw = ids.iter().map(|s| model.embed_ids(&[s.as_slice()]).unwrap().remove(0)).collect();
        let got = finish_all(model, &case, raw);
        let mut lowest = f64::MAX;
        for (i, (g, want)) in got.iter().zip(&case.embeddings).enumerate() {
            let c = cosine(g, want);
            assert!(c >= min_cos, "{} [{i}] ({} tokens): cosine {c:.7} < {min_cos}", case.name, ids[i].len());
            lowest = lowest.min(c);
        }
        eprintln!("{}: lowest cosine {lowest:.8}", case.name);
        all.push((case, got));
    }
    all
}

#[test]
fn the_folder_is_the_one_the_references_were_made_from() {
    let dir = model_dir();
    let verified = std::fs::read_to_string(dir.join(".verified")).unwrap();
    for (file, sha) in reference().sha256 {
        assert!(verified.contains(&format!("{sha}  {file}")), "{file}: the references were made from {sha}");
    }
}

#[test]
fn f32_vectors_match_sentence_transformers_and_a_padded_batch_matches_each_text_alone() {
    let _g = mlx_lock();
    let model = load(Dtype::Float32);
    let checked = check_alone(&model, 0.99999, usize::MAX);
    assert_eq!(checked.len(), reference().cases.len());
    // Texts of 9 to 656 tokens in one padded batch, and a batch of short queries.
    for (case, alone) in checked.iter().filter(|(c, _)| c.name == "mixed lengths" || c.name == "query") {
        let ids = ids(&model, case);
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let batched = finish_all(&model, case, model.embed_ids(&refs).unwrap());
        for (i, (b, a)) in batched.iter().zip(alone.iter()).enumerate() {
            let d = max_abs_diff(b, a);
            assert!(d <= 1e-6, "{} [{i}]: batched differs from alone by {d:e}", case.name);
        }
    }
}

#[test]
fn bf16_vectors_stay_close_to_sentence_transformers() {
    let _g = mlx_lock();
    // bf16 runs on MLX's CPU backend without BLAS (far slower than f32, the CPU default): the
    // short cases only.
    let checked = check_alone(&load(Dtype::Bfloat16), 0.999, 100);
    assert!(checked.len() >= 6, "{} cases", checked.len());
}

#[test]
fn what_the_model_is_comes_from_its_own_files() {
    let _g = mlx_lock();
    let model = load(Dtype::Float32);
    let info = model.info();
    assert_eq!((info.dimensions, info.hidden_size, info.max_tokens), (768, 768, 2048));
    assert_eq!(info.allowed_dimensions, vec![768, 512, 256, 128]);
    assert_eq!(info.prompts["query"], "task: search result | query: ");
    assert_eq!(info.prompts["document"], "title: none | text: ");
    assert_eq!(info.default_prompt, None);
}

#[test]
fn a_text_holding_a_token_without_an_embedding_row_is_refused_by_name() {
    let _g = mlx_lock();
    let model = load(Dtype::Float32);
    let pre = model.preprocessor();
    // The tokenizer knows <image_soft_token> (id 262144); the table has 262,144 rows.
    let err = pre.tokenize("", "look: <image_soft_token> here", None, Truncation::Right).unwrap_err().to_string();
    assert!(err.contains("<image_soft_token>") && err.contains("262144"), "{err}");
    // Plain text around it is fine.
    assert!(pre.tokenize("", "look: image soft token here", None, Truncation::Right).is_ok());
}

/// The real folder laid out as Python's `huggingface_hub` leaves it in its cache: blobs named by
/// the hub's ETags (sha256 for LFS files, the git blob id for the others), snapshot links to them,
/// `refs/main`. Blobs are links to the cached folder's files (no 1.2 GB copy).
fn hub_cache(dir: &Path, commit: &str) -> PathBuf {
    let src = model_dir();
    let repo = dir.join("models--google--embeddinggemma-300m");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join(commit));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let files = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "added_tokens.json", "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
        "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors", "3_Dense/config.json",
        "3_Dense/model.safetensors", "model.safetensors", "generation_config.json", "README.md"];
    for f in files {
        let path = src.join(f);
        let lfs = f.ends_with(".safetensors") || f == "tokenizer.json" || f == "tokenizer.model";
        let etag = if lfs { sha256_file(&path) } else { fake_hub::git_blob_id(&std::fs::read(&path).unwrap()) };
        let blob = blobs.join(&etag);
        if !blob.exists() {
            std::os::unix::fs::symlink(&path, &blob).unwrap();
        }
        let link = snapshot.join(f);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(f.matches('/').count() + 2);
        std::os::unix::fs::symlink(format!("{up}blobs/{etag}"), &link).unwrap();
    }
    dir.to_path_buf()
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

fn grpcurl(addr: &str, data: &str, method: &str) -> serde_json::Value {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/grpcurl");
    let out = Command::new(&bin).args(["-plaintext", "-max-msg-sz", "67108864", "-d", data, addr, method]).output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh installs grpcurl)", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return serde_json::json!({ "error": text });
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn served_from_the_hub_cache_offline_grpcurl_gets_the_reference_vectors() {
    let home = tempfile::tempdir().unwrap();
    let commit = "c0ffee0c0ffee0c0ffee0c0ffee0c0ffee0c0ffe";
    let cache = hub_cache(&home.path().join("hub"), commit);
    let config = home.path().join("config.yaml");
    std::fs::write(&config, "models:\n  - {name: embeddinggemma-300m, source: 'hf://google/embeddinggemma-300m', dtype: f32, device: cpu}\n").unwrap();
    let (child, addr, log) = spawn_serve(&config, |c| {
        c.env_remove("HF_TOKEN").env("HF_HUB_CACHE", &cache).env("HF_HUB_OFFLINE", "1").env("HF_ENDPOINT", "http://127.0.0.1:9");
    });
    let _child = Killed(child);
    let t0 = Instant::now();
    let model = loop {
        let m = grpcurl(&addr, r#"{"model":"embeddinggemma-300m"}"#, "embedding.v1.EmbeddingService/GetModel");
        if m["state"] == "MODEL_STATE_READY" {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "not ready: {m}\n{}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(model["revision"], commit, "{model}");
    assert_eq!(model["dimensions"], 768, "{model}");
    assert_eq!(model["allowedDimensions"], serde_json::json!([768, 512, 256, 128]), "{model}");
    assert_eq!(model["maxTokens"], 2048, "{model}");
    assert_eq!(model["prompts"]["query"], "task: search result | query: ", "{model}");

    let reference = reference();
    for case in reference.cases.iter().filter(|c| c.token_ids.iter().all(|t| t.len() < 600)) {
        let items: Vec<_> = case.texts.iter().map(|t| serde_json::json!({ "text": t })).collect();
        let mut req = serde_json::json!({ "model": "embeddinggemma-300m", "items": items });
        if let Some(p) = &case.prompt_name {
            req["promptName"] = p.clone().into();
        }
        if let Some(d) = case.dimensions {
            req["dimensions"] = d.into();
        }
        let resp = grpcurl(&addr, &req.to_string(), "embedding.v1.EmbeddingService/Embed");
        let embeddings = resp["embeddings"].as_array().unwrap_or_else(|| panic!("{}: {resp}", case.name));
        for (i, (e, want)) in embeddings.iter().zip(&case.embeddings).enumerate() {
            let got: Vec<f32> = e["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let c = cosine(&got, want);
            assert!(c >= 0.99999, "{} [{i}]: cosine {c:.7}", case.name);
            assert_eq!(e["tokenCount"], case.token_ids[i].len(), "{} [{i}]", case.name);
        }
    }

    // A text holding a token the table has no row for: refused, naming the item; the next
    // request is served.
    let bad = grpcurl(&addr, r#"{"model":"embeddinggemma-300m","items":[{"text":"fine"},{"text":"<image_soft_token>"}]}"#,
        "embedding.v1.EmbeddingService/Embed");
    let err = bad["error"].as_str().unwrap_or_else(|| panic!("accepted: {bad}"));
    assert!(err.contains("InvalidArgument") && err.contains("items[1].text") && err.contains("<image_soft_token>"), "{err}");
    let ok = grpcurl(&addr, r#"{"model":"embeddinggemma-300m","items":[{"text":"fine"}]}"#, "embedding.v1.EmbeddingService/Embed");
    assert_eq!(ok["embeddings"].as_array().map(Vec::len), Some(1), "{ok}");
}
