//! Shared test helpers: the committed reference fixtures and the lock every MLX-touching test holds.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use mlx_embed::mlx::Dtype;
use mlx_embed::models::{EmbeddingModel, LoadOptions, PromptChoice};
use serde::Deserialize;

pub mod fake_hub;
pub mod raw;
pub mod server;

static MLX: Mutex<()> = Mutex::new(());

/// MLX is not thread-safe and tests run on several threads: hold this while using MLX.
pub fn mlx_lock() -> MutexGuard<'static, ()> {
    MLX.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub architecture: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt_name: Option<String>,
    pub instruction: Option<String>,
    pub prompt: String,
    pub dimensions: Option<i32>,
    pub texts: Vec<String>,
    pub token_ids: Vec<Vec<u32>>,
    pub embeddings: Vec<Vec<f32>>,
}

impl Case {
    pub fn prompt_choice(&self) -> PromptChoice {
        match (&self.prompt_name, &self.instruction) {
            (Some(n), _) => PromptChoice::Name(n.clone()),
            (None, Some(i)) => PromptChoice::Instruction(i.clone()),
            (None, None) => PromptChoice::None,
        }
    }
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every fixture folder that carries a `reference.json`, sorted by name.
pub fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures with reference.json");
    v
}

pub fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn is_quantized(dir: &Path) -> bool {
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c.get("quantization").is_some()
}

pub fn load(dir: &Path, dtype: Dtype) -> EmbeddingModel {
    load_compiled(dir, dtype, None)
}

/// [`load`] with the encoder compiled (`Some(true)`), not (`Some(false)`) or as the device's
/// default (`None`).
pub fn load_compiled(dir: &Path, dtype: Dtype, compile: Option<bool>) -> EmbeddingModel {
    EmbeddingModel::load(dir, LoadOptions { dtype: Some(dtype), gpu: gpu(), compile, compile_min_tokens: compile.map(|_| 0), ..Default::default() })
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Tests run on the GPU when MLX has one (the CUDA runtime on an NVIDIA machine).
pub fn gpu() -> bool {
    std::env::var("MLX_EMBED_TEST_DEVICE").map(|d| d == "gpu").unwrap_or(false)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A scratch copy of fixture `name` to break in a test.
pub fn scratch_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures_dir().join(name), tmp.path());
    tmp
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Edits a JSON file in place.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Edits the JSON header of a safetensors file in place, keeping the tensor data.
pub fn edit_safetensors_header(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let (header, data) = read_safetensors(path);
    let mut header = serde_json::Value::Object(header);
    f(&mut header);
    write_safetensors(path, &header, &data);
}

/// Reads a safetensors file as (header, data).
pub fn read_safetensors(path: &Path) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

/// Writes a safetensors file (header padded to 8 bytes, as the format recommends).
pub fn write_safetensors(path: &Path, header: &impl serde::Serialize, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// A config serving the `qwen3-tiny` fixture as `q`, with `extra` YAML on top.
pub fn q_config(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let model = fixtures_dir().join("qwen3-tiny");
    std::fs::write(&path, format!("{extra}\nmodels:\n  - {{name: q, source: {}, dtype: f32, device: cpu}}\n", model.display())).unwrap();
    (dir, path)
}

/// `mlx-embed serve` on ports chosen by the system, with `config`; `adjust` sets the environment
/// (or more arguments). Returns the child, its gRPC address and its log so far (kept filling).
pub fn spawn_serve(config: &Path, adjust: impl FnOnce(&mut std::process::Command))
    -> (std::process::Child, String, std::sync::Arc<Mutex<String>>)
{
    use std::io::{BufRead, BufReader};
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mlx-embed"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--config"]).arg(config)
        .stderr(std::process::Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut early = String::new();
    let addr = loop {
        let line = lines.next().unwrap_or_else(|| panic!("server exited early:\n{early}")).unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
        early.push_str(&(line + "\n"));
    };
    let log = std::sync::Arc::new(Mutex::new(early));
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || for l in lines.map_while(Result::ok) { sink.lock().unwrap().push_str(&(l + "\n")); });
    (child, addr, log)
}

/// The Prometheus address a server started by [`spawn_serve`] printed.
pub fn metrics_addr(log: &Mutex<String>) -> String {
    let log = log.lock().unwrap();
    log.lines().find_map(|l| l.strip_prefix("metrics on ")).expect("no metrics address in the log").to_string()
}

/// The value of the series `name{labels}` (labels in the exporter's order) at `GET /metrics`.
pub fn scrape_value(metrics_addr: &str, series: &str) -> Option<f64> {
    let text = ureq::get(&format!("http://{metrics_addr}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of the series of `name` whose labels include every one of `labels` (`code="OK"`),
/// at `GET /metrics` (0 when none is exported).
pub fn scrape_sum(metrics_addr: &str, name: &str, labels: &[&str]) -> f64 {
    let text = ureq::get(&format!("http://{metrics_addr}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.rsplit_once("} "))
        .filter(|(series, _)| labels.iter().all(|want| series.split(',').any(|label| label == *want)))
        .map(|(_, v)| v.trim().parse::<f64>().unwrap())
        .sum()
}
