//! Parity with the reference implementation (transformers / sentence-transformers, or an
//! independent dequantization for MLX-quantized folders) on every committed fixture: token ids,
//! vectors in f32, padded batches against one-by-one, and bf16 against f32.

mod common;

use common::*;
use mlx_embed::mlx::Dtype;
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
                let ids = pre.tokenize(&prompt, text, None, Truncation::Off).unwrap();
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

#[test]
fn a_padded_batch_gives_the_same_vectors_as_one_by_one() {
    let _g = mlx_lock();
    let mut failures = Failures::default();
    for dir in fixtures() {
        let model = load(&dir, Dtype::Float32);
        let case = &reference(&dir).cases[0];
        let batched = model.embed_texts(&case.texts, &case.prompt_choice(), None).unwrap();
        for (text, b) in case.texts.iter().zip(&batched) {
            let alone = model.embed_texts(std::slice::from_ref(text), &case.prompt_choice(), None).unwrap();
            let d = max_abs_diff(&alone[0], b);
            failures.check(d <= 1e-5, || format!("{}: {text:?} batched vs alone: {d:e}", dir.display()));
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
