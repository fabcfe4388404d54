//! The one-shot `mlx-embed embed` command keeps its contract: one JSON object on stdout with
//! model, dimensions, dtype, device and one vector per text in input order (texts from `--input`
//! may hold newlines); errors go to stderr with a non-zero exit.

mod common;

use std::process::Command;

use common::*;

fn embed_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
}

#[test]
fn embed_prints_reference_vectors_for_texts_from_a_file() {
    let dir = fixtures_dir().join("gemma-tiny");
    let case = reference(&dir).cases.into_iter().find(|c| c.prompt_name.as_deref() == Some("query")).unwrap();
    assert!(case.texts.iter().any(|t| t.contains('\n')), "fixture should hold a text with a newline");
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("texts.json");
    std::fs::write(&input, serde_json::to_string(&case.texts).unwrap()).unwrap();
    let out = embed_cmd()
        .args(["embed", "--model-dir"]).arg(&dir)
        .args(["--prompt-name", "query", "--dtype", "f32", "--device", "cpu", "--input"]).arg(&input)
        .output().unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(v["model"], "gemma-tiny");
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["device"], "cpu");
    let got: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    assert_eq!(got.len(), case.texts.len());
    assert_eq!(v["dimensions"], got[0].len());
    for (g, w) in got.iter().zip(&case.embeddings) {
        assert!(max_abs_diff(g, w) <= 1e-5);
    }
}

#[test]
fn embed_cuts_to_the_requested_dimensions_with_an_instruction() {
    let dir = fixtures_dir().join("qwen3-tiny");
    let case = reference(&dir).cases.into_iter().find(|c| c.instruction.is_some()).unwrap();
    let out = embed_cmd()
        .args(["embed", "--model-dir"]).arg(&dir)
        .args(["--instruction", case.instruction.as_deref().unwrap(), "--dimensions", "40", "--dtype", "f32", "--device", "cpu"])
        .args(&case.texts[..2])
        .output().unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    assert_eq!(v["dimensions"], 40);
    for (g, w) in got.iter().zip(&case.embeddings) {
        let want = mlx_embed::models::finish(w.clone(), 40, true);
        assert!(max_abs_diff(g, &want) <= 1e-5);
    }
}

#[test]
fn embed_errors_go_to_stderr_with_a_failing_exit() {
    let dir = fixtures_dir().join("qwen3-tiny");
    for (args, needle) in [
        (vec!["--prompt-name", "nope", "hi"], "unknown prompt `nope`"),
        (vec!["--dimensions", "7", "hi"], "dimensions"),
        (vec![], "no texts"),
    ] {
        let out = embed_cmd().args(["embed", "--device", "cpu", "--model-dir"]).arg(&dir).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: stderr {err:?} lacks {needle:?}");
    }
}

/// `(file, target)` of a dynamic loader's line binding `malloc` (`LD_DEBUG=bindings`:
/// "PID: binding file FILE [N] to TARGET [N]: normal symbol `malloc' …"), `None` for any other
/// line, and for one that another thread's output broke into.
fn malloc_binding(line: &str) -> Option<(&str, &str)> {
    let plain = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    let (file, rest) = line.split_once("binding file ")?.1.split_once(" [")?;
    let (n, rest) = rest.split_once("] to ")?;
    let (target, rest) = rest.split_once(" [")?;
    let (m, rest) = rest.split_once("]: ")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (plain(file) && plain(target) && digits(n) && digits(m) && rest.starts_with("normal symbol `malloc'"))
        .then_some((file, target))
}

/// The binary's allocator serves MLX's C++ code too: the dynamic linker binds libmlx's and the
/// C++ library's `malloc` to the executable, not to the C library. (One thread for OpenBLAS and
/// the tokenizer: the loader's lines of several threads can interleave.)
#[test]
fn mlx_and_the_cpp_library_allocate_through_the_binarys_malloc() {
    if !cfg!(target_os = "linux") {
        // The binary installs its allocator on Linux only, and LD_DEBUG is glibc's loader's.
        return eprintln!("skipped on {}: the binary replaces malloc on Linux only", std::env::consts::OS);
    }
    let dir = fixtures_dir().join("qwen3-tiny");
    let out = embed_cmd()
        .env("LD_DEBUG", "bindings")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .args(["embed", "--device", "cpu", "--dtype", "f32", "--model-dir"]).arg(&dir).arg("hello")
        .output().unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    let bound_to = |library: &str| -> Vec<&str> {
        log.lines()
            .filter_map(malloc_binding)
            .filter(|(file, _)| file.rsplit('/').next().is_some_and(|f| f.starts_with(library)))
            .map(|(_, target)| target)
            .collect()
    };
    let exe = env!("CARGO_BIN_EXE_mlx-embed");
    for library in ["libmlx.so", "libstdc++.so"] {
        let targets = bound_to(library);
        assert!(!targets.is_empty(), "no binding of {library}'s malloc in the loader's log");
        assert!(targets.iter().all(|t| *t == exe), "{library}'s malloc bound to {targets:?}, not {exe}");
    }
}
