//! Parity with the reference implementation (transformers / sentence-transformers, or an
//! independent dequantization for MLX-quantized folders) on every committed fixture: token ids,
//! vectors in f32, padded batches against one-by-one, and bf16 against f32.

mod common;

use common::*;
use mlx_embed::mlx::Dtype;
use mlx_embed::models::{EmbeddingModel, LoadOptions, PromptChoice};
use mlx_embed::tokenize::Truncation;

/// f32 tolerance: 1e-5, or 1e-4 for quantized models against their dequantized reference.
/// `MLX_EMBED_F32_TOL` may loosen it where MLX's GPU matmuls run f32 through TF32.
fn tolerance(dir: &std::path::Path) -> f32 {
    let base = if is_quantized(dir) { 1e-4 } else { 1e-5 };
    std::env::var("MLX_EMBED_F32_TOL").ok().and_then(|v| v.parse().ok()).map_or(base, |t: f32| t.max(base))
}

/// Collects failures across all fixtures and cases, so one run shows every mismatch.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            let m = msg();
            eprintln!("FAIL {m}");
            self.0.push(m);
        }
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "{} failures:\n{}", self.0.len(), self.0.join("\n"));
    }
}

#[test]
fn tokenization_matches_the_reference_token_ids() {
    let _g = mlx_lock();
    for dir in fixtures() {
        let model = load(&dir, Dtype::Float32);
        let pre = model.preprocessor();
        for case in reference(&dir).cases {
            let prompt = pre.prompt(&case.prompt_choice()).unwrap();
            assert_eq!(prompt, case.prompt, "{} / {}: prompt", dir.display(), case.name);
            for (text, want) in case.texts.iter().zip(&case.token_ids) {
                let ids = pre.tokenize(&prompt, text, None, Truncation::Off).unwrap().ids;
                assert_eq!(&ids, want, "{} / {}: {text:?}", dir.display(), case.name);
            }
        }
    }
}

#[test]
fn f32_vectors_match_the_reference() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    for dir in fixtures() {
        let model = load(&dir, Dtype::Float32);
        let tol = tolerance(&dir);
        for case in reference(&dir).cases {
            let got = model.embed_texts(&case.texts, &case.prompt_choice(), case.dimensions).unwrap();
            let worst = got.iter().zip(&case.embeddings).map(|(g, w)| max_abs_diff(g, w)).fold(0.0, f32::max);
            eprintln!("{} / {}: max |Δ| = {worst:.2e}", dir.file_name().unwrap().to_string_lossy(), case.name);
            failures.check(worst <= tol, || format!("{} / {}: max |Δ| {worst:e} > {tol:e}", dir.display(), case.name));
        }
    }
    failures.assert_none();
}

/// Embeds `texts` as one batch and each alone, and records every text whose two vectors differ
/// by more than 1e-5.
fn check_batched_matches_alone(model: &EmbeddingModel, texts: &[String], prompt: &PromptChoice, what: &str, failures: &mut Failures) {
    let batched = model.embed_texts(texts, prompt, None).unwrap();
    failures.check(batched.len() == texts.len(), || format!("{what}: {} vectors for {} texts", batched.len(), texts.len()));
    for (i, (text, b)) in texts.iter().zip(&batched).enumerate() {
        let alone = model.embed_texts(std::slice::from_ref(text), prompt, None).unwrap();
        let d = max_abs_diff(&alone[0], b);
        let start: String = text.chars().take(40).collect();
        failures.check(d <= 1e-5, || format!("{what}: text {i} ({start:?}…) batched vs alone: {d:e}"));
    }
}

#[test]
fn a_padded_batch_gives_the_same_vectors_as_one_by_one() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    for dir in fixtures() {
        let model = load(&dir, Dtype::Float32);
        let case = &reference(&dir).cases[0];
        check_batched_matches_alone(&model, &case.texts, &case.prompt_choice(), &dir.display().to_string(), &mut failures);
    }
    failures.assert_none();
}

/// The encoder compiled and not: both match the reference, in batches of every size from one
/// text up (each size a shape of its own, padded), and agree with each other.
#[test]
fn a_compiled_encoder_gives_the_reference_vectors() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    for dir in fixtures() {
        let tol = tolerance(&dir);
        let compiled = load_compiled(&dir, Dtype::Float32, Some(true));
        let plain = load_compiled(&dir, Dtype::Float32, Some(false));
        for case in reference(&dir).cases {
            for n in 1..=case.texts.len() {
                let texts = &case.texts[..n];
                let got = compiled.embed_texts(texts, &case.prompt_choice(), case.dimensions).unwrap();
                let base = plain.embed_texts(texts, &case.prompt_choice(), case.dimensions).unwrap();
                for (i, (g, b)) in got.iter().zip(&base).enumerate() {
                    let (dr, dp) = (max_abs_diff(g, &case.embeddings[i]), max_abs_diff(g, b));
                    failures.check(dr <= tol && dp <= tol, || format!(
                        "{} / {} batch of {n}, text {i}: compiled vs reference {dr:e}, vs uncompiled {dp:e}", dir.display(), case.name));
                }
            }
        }
    }
    failures.assert_none();
}

/// A batch of very different lengths (run on the CPU as groups of similar lengths, then put back
/// in order) gives each text's vector alone, in the order given.
#[test]
fn a_batch_of_mixed_lengths_gives_each_vector_in_order() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    let long = "vector search over a large index of documents ".repeat(40);
    let medium = "exact embeddings for a database ".repeat(8);
    let texts = vec![long, "hi".to_string(), medium, "short query".to_string()];
    for dir in fixtures() {
        let model = load(&dir, Dtype::Float32);
        let lens: Vec<usize> = texts.iter().map(|t| model.preprocessor().tokenize("", t, None, Truncation::Right).unwrap().ids.len()).collect();
        check_batched_matches_alone(&model, &texts, &PromptChoice::None, &format!("{} (token lengths {lens:?})", dir.display()), &mut failures);
    }
    failures.assert_none();
}

/// Batches padded to GPU shapes (extra rows, longer rows) give the reference vectors, for every
/// batch size from one text up.
#[test]
fn batches_at_padded_shapes_give_the_reference_vectors() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    for dir in fixtures() {
        let tol = tolerance(&dir);
        let opts = LoadOptions { dtype: Some(Dtype::Float32), gpu: gpu(), gpu_shapes: Some(true), ..Default::default() };
        let model = EmbeddingModel::load(&dir, opts).unwrap();
        for case in reference(&dir).cases {
            for n in 1..=case.texts.len() {
                let got = model.embed_texts(&case.texts[..n], &case.prompt_choice(), case.dimensions).unwrap();
                failures.check(got.len() == n, || format!("{}: {} vectors for {n} texts", dir.display(), got.len()));
                for (i, g) in got.iter().enumerate() {
                    let d = max_abs_diff(g, &case.embeddings[i]);
                    failures.check(d <= tol, || format!("{} / {} batch of {n}, text {i}: {d:e}", dir.display(), case.name));
                }
            }
        }
    }
    failures.assert_none();
}

#[test]
fn bf16_vectors_are_close_to_the_reference() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    for dir in fixtures() {
        let model = load(&dir, Dtype::Bfloat16);
        for case in reference(&dir).cases {
            let got = model.embed_texts(&case.texts, &case.prompt_choice(), case.dimensions).unwrap();
            let worst = got.iter().zip(&case.embeddings).map(|(g, w)| cosine(g, w)).fold(1.0, f64::min);
            eprintln!("{} / {} bf16: min cosine {worst:.6}", dir.file_name().unwrap().to_string_lossy(), case.name);
            failures.check(worst >= 0.999, || format!("{} / {}: bf16 cosine {worst}", dir.display(), case.name));
        }
    }
    failures.assert_none();
}

/// Rounds an f32 to the nearest f16 (ties to even) and returns its bits; values here are small
/// and normal, so no overflow or subnormal handling is needed beyond flushing to zero.
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    assert!(exp < 31, "{x} overflows f16");
    let mant = b & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// Rewrites every F32 tensor of a safetensors file as F16.
fn to_f16(path: &std::path::Path) {
    let (header, data) = read_safetensors(path);
    let mut out_header = serde_json::Map::new();
    let mut out_data = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            out_header.insert(name, info);
            continue;
        }
        assert_eq!(info["dtype"], "F32");
        let (a, b) = (info["data_offsets"][0].as_u64().unwrap() as usize, info["data_offsets"][1].as_u64().unwrap() as usize);
        let start = out_data.len();
        for c in data[a..b].chunks(4) {
            out_data.extend_from_slice(&f16_bits(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes());
        }
        out_header.insert(name, serde_json::json!({"dtype": "F16", "shape": info["shape"], "data_offsets": [start, out_data.len()]}));
    }
    write_safetensors(path, &out_header, &out_data);
}

#[test]
fn float16_weights_are_upcast_and_stay_close_to_the_reference() {
    let d = scratch_copy("gemma-tiny");
    to_f16(&d.path().join("model.safetensors"));
    let _g = mlx_lock();
    let model = load(d.path(), Dtype::Float32);
    let case = &reference(d.path()).cases[0];
    let got = model.embed_texts(&case.texts, &case.prompt_choice(), case.dimensions).unwrap();
    let worst = got.iter().zip(&case.embeddings).map(|(g, w)| cosine(g, w)).fold(1.0, f64::min);
    assert!(worst >= 0.999, "f16 weights: cosine {worst}");
    // The weights really were f16 (rounded): the vectors are not bit-identical to f32's.
    let exact = got.iter().zip(&case.embeddings).all(|(g, w)| max_abs_diff(g, w) <= 1e-7);
    assert!(!exact, "f16 conversion had no effect");
}

#[test]
fn truncation_keeps_special_tokens_and_says_so() {
    let _g = mlx_lock();
    for (fixture, first, last) in [("qwen3-tiny", None, Some(560u32)), ("qwen3-tiny-q4", None, Some(560)), ("gemma-tiny", Some(2u32), Some(1u32))] {
        let model = load(&fixtures_dir().join(fixture), Dtype::Float32);
        let pre = model.preprocessor();
        let text = reference(&fixtures_dir().join(fixture)).cases[0].texts.iter().max_by_key(|t| t.len()).unwrap().clone();
        let full = pre.tokenize("", &text, None, Truncation::Off).unwrap();
        assert!(!full.truncated && full.ids.len() > 12);
        for (dir, keep_start) in [(Truncation::Right, true), (Truncation::Left, false)] {
            let cut = pre.tokenize("", &text, Some(10), dir).unwrap();
            assert!(cut.truncated && cut.ids.len() == 10, "{fixture}: {cut:?}");
            if let Some(f) = first { assert_eq!(cut.ids[0], f, "{fixture}: first token kept"); }
            if let Some(l) = last { assert_eq!(cut.ids[9], l, "{fixture}: end token kept"); }
            let inner = if first.is_some() { &full.ids[1..] } else { &full.ids[..] };
            let body = &cut.ids[usize::from(first.is_some())..9];
            if keep_start {
                assert_eq!(body, &inner[..body.len()], "{fixture}: keeps the beginning");
            } else {
                let end = inner.len() - 1;
                assert_eq!(body, &inner[end - body.len()..end], "{fixture}: keeps the end");
            }
        }
        let err = pre.tokenize("", &text, Some(10), Truncation::Off).unwrap_err().to_string();
        assert!(err.contains(&full.ids.len().to_string()) && err.contains("10"), "{err}");
    }
}

#[test]
fn truncating_from_the_start_keeps_the_prompt() {
    let _g = mlx_lock();
    let model = load(&fixtures_dir().join("qwen3-tiny"), Dtype::Float32);
    let pre = model.preprocessor();
    let prompt = pre.prompt(&mlx_embed::models::PromptChoice::Name("query".into())).unwrap();
    let text = "words that go on and on ".repeat(20);
    let full = pre.tokenize(&prompt, &text, None, Truncation::Off).unwrap().ids;
    let prompt_len = full.iter().zip(pre.tokenize(&prompt, "", None, Truncation::Off).unwrap().ids.iter()).take_while(|(a, b)| a == b).count();
    assert!(prompt_len > 5);
    let cut = pre.tokenize(&prompt, &text, Some(prompt_len + 10), Truncation::Left).unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.ids.len(), prompt_len + 10);
    assert_eq!(&cut.ids[..prompt_len], &full[..prompt_len], "the prompt survives");
    assert_eq!(&cut.ids[prompt_len..], &full[full.len() - 10..], "then the end of the text (and the end token)");
    // A limit the prompt alone fills is an error, not a silent loss of the prompt.
    let err = pre.tokenize(&prompt, &text, Some(prompt_len), Truncation::Left).unwrap_err().to_string();
    assert!(err.contains("prompt"), "{err}");
}

#[test]
fn a_huge_text_is_cut_before_tokenizing() {
    let _g = mlx_lock();
    let model = load(&fixtures_dir().join("gemma-tiny"), Dtype::Float32);
    let pre = model.preprocessor();
    let huge = "vector ".repeat(2_000_000); // 14 MB
    let t = std::time::Instant::now();
    let enc = pre.tokenize("", &huge, Some(16), Truncation::Right).unwrap();
    assert!(enc.truncated && enc.ids.len() == 16);
    assert_eq!(enc.ids, pre.tokenize("", &huge[..4096], Some(16), Truncation::Right).unwrap().ids);
    let err = pre.tokenize("", &huge, Some(16), Truncation::Off).unwrap_err().to_string();
    assert!(err.contains("bytes") && err.contains("16 tokens"), "{err}");
    eprintln!("14 MB text cut to 16 tokens in {:?}", t.elapsed());
}
