//! Which files a model needs, as the loader reads them: `config.json`, `tokenizer.json`, the
//! weights (`model.safetensors`, or the shards `model.safetensors.index.json` names), the
//! sentence-transformers files when the repository has them (`modules.json` and each listed
//! module's `config.json` and weights, `config_sentence_transformers.json`,
//! `sentence_bert_config.json`). Nothing else is fetched: no PyTorch, ONNX or GGUF copies.
//!
//! The walk asks a [`Store`] whether a file exists and fetches it, reading `modules.json` and
//! index files as it goes. The same walk downloads from the hub, checks that the cache holds a
//! complete copy, and lists a local folder.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::PullError;

/// Where the walk finds files.
pub trait Store {
    /// Whether the revision has `file` (an error when that cannot be told).
    fn has(&mut self, file: &str) -> Result<bool, PullError>;
    /// Makes `file` available on disk, checked, and returns its path.
    fn fetch(&mut self, file: &str) -> Result<PathBuf, PullError>;
    /// The repository, for messages.
    fn name(&self) -> &str;
}

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["config_sentence_transformers.json", "sentence_bert_config.json"];

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct Index {
    weight_map: std::collections::HashMap<String, String>,
}

/// Fetches every file the model needs through `store`; returns their names in fetch order. The
/// model's weights come last, so once they are on disk every other file has been settled.
pub fn walk(store: &mut dyn Store) -> Result<Vec<String>, PullError> {
    let mut files = Vec::new();
    for f in REQUIRED {
        if !store.has(f)? {
            return Err(PullError::Missing { repo: store.name().into(), file: f.into() });
        }
        store.fetch(f)?;
        files.push(f.to_string());
    }
    for f in OPTIONAL {
        if store.has(f)? {
            store.fetch(f)?;
            files.push(f.to_string());
        }
    }
    if store.has("modules.json")? {
        let path = store.fetch("modules.json")?;
        files.push("modules.json".into());
        let modules: Vec<Module> = read_json(&path, "modules.json")?;
        for (i, m) in modules.iter().enumerate() {
            if m.path.is_empty() {
                continue; // the Transformer module: the repository's root
            }
            let dir = checked_path(&m.path).map_err(|message| PullError::Invalid {
                file: "modules.json".into(),
                message: format!("[{i}].path: {message}"),
            })?;
            let config = join(&dir, "config.json");
            if store.has(&config)? {
                store.fetch(&config)?;
                files.push(config);
            }
            if m.kind.rsplit('.').next() == Some("Dense") {
                weights(store, &dir, &mut files)?;
            }
        }
    }
    weights(store, "", &mut files)?;
    Ok(files)
}

/// `model.safetensors` in `dir`, else the index there and the shards it names.
fn weights(store: &mut dyn Store, dir: &str, files: &mut Vec<String>) -> Result<(), PullError> {
    let single = join(dir, "model.safetensors");
    if store.has(&single)? {
        store.fetch(&single)?;
        files.push(single);
        return Ok(());
    }
    let index_name = join(dir, "model.safetensors.index.json");
    if !store.has(&index_name)? {
        return Err(PullError::Missing { repo: store.name().into(), file: single });
    }
    let path = store.fetch(&index_name)?;
    files.push(index_name.clone());
    let index: Index = read_json(&path, &index_name)?;
    let shards: BTreeSet<&String> = index.weight_map.values().filter(|s| !s.is_empty()).collect();
    for shard in shards {
        checked_path(shard).map_err(|message| PullError::Invalid { file: index_name.clone(), message: format!("weight_map: {message}") })?;
        let name = join(dir, shard);
        if !store.has(&name)? {
            return Err(PullError::Missing { repo: store.name().into(), file: name });
        }
        store.fetch(&name)?;
        files.push(name);
    }
    Ok(())
}

fn join(dir: &str, file: &str) -> String {
    if dir.is_empty() { file.to_string() } else { format!("{}/{file}", dir.trim_end_matches('/')) }
}

/// A relative path that stays inside the repository.
fn checked_path(p: &str) -> Result<String, String> {
    let path = Path::new(p);
    let odd = |c: char| c.is_control() || matches!(c, '\\' | '?' | '#' | '%');
    if p.is_empty() || p.contains(odd) || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("`{p}` is not a path inside the repository"));
    }
    Ok(p.trim_end_matches('/').to_string())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, name: &str) -> Result<T, PullError> {
    let text = std::fs::read_to_string(path).map_err(|e| PullError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| PullError::Invalid { file: name.into(), message: e.to_string() })
}

/// A local folder: a file exists or not.
pub struct Folder<'a>(pub &'a Path);

impl Store for Folder<'_> {
    fn has(&mut self, file: &str) -> Result<bool, PullError> {
        if !self.0.is_dir() {
            return Err(PullError::Other(format!("{}: no such folder", self.0.display())));
        }
        Ok(self.0.join(file).is_file())
    }

    fn fetch(&mut self, file: &str) -> Result<PathBuf, PullError> {
        Ok(self.0.join(file))
    }

    fn name(&self) -> &str {
        self.0.to_str().unwrap_or("the model folder")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    #[test]
    fn a_sentence_transformers_repo_needs_its_modules_and_nothing_else() {
        let dir = folder(&[
            ("config.json", "{}"), ("tokenizer.json", "{}"), ("tokenizer_config.json", "{}"),
            ("model.safetensors", ""), ("pytorch_model.bin", ""), ("onnx/model.onnx", ""), ("README.md", ""),
            ("config_sentence_transformers.json", "{}"),
            ("modules.json", r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                                {"idx":2,"name":"2","path":"2_Dense","type":"sentence_transformers.models.Dense"},
                                {"idx":3,"name":"3","path":"3_Normalize","type":"sentence_transformers.models.Normalize"}]"#),
            ("1_Pooling/config.json", "{}"), ("2_Dense/config.json", "{}"), ("2_Dense/model.safetensors", ""),
        ]);
        let files = walk(&mut Folder(dir.path())).unwrap();
        assert_eq!(files, ["config.json", "tokenizer.json", "config_sentence_transformers.json",
            "modules.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors", "model.safetensors"]);
    }

    #[test]
    fn sharded_weights_bring_every_shard_once() {
        let dir = folder(&[
            ("config.json", "{}"), ("tokenizer.json", "{}"),
            ("model.safetensors.index.json", r#"{"weight_map":{"a":"model-2.safetensors","b":"model-1.safetensors","c":"model-2.safetensors"}}"#),
            ("model-1.safetensors", ""), ("model-2.safetensors", ""),
        ]);
        let files = walk(&mut Folder(dir.path())).unwrap();
        assert_eq!(files, ["config.json", "tokenizer.json", "model.safetensors.index.json", "model-1.safetensors", "model-2.safetensors"]);
    }

    #[test]
    fn a_missing_shard_or_tokenizer_is_named() {
        let dir = folder(&[("config.json", "{}"), ("tokenizer.json", "{}"),
            ("model.safetensors.index.json", r#"{"weight_map":{"a":"model-1.safetensors"}}"#)]);
        let err = walk(&mut Folder(dir.path())).unwrap_err().to_string();
        assert!(err.contains("model-1.safetensors"), "{err}");
        let dir = folder(&[("config.json", "{}"), ("model.safetensors", "")]);
        let err = walk(&mut Folder(dir.path())).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn paths_that_leave_the_repository_are_refused() {
        let dir = folder(&[("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors", ""),
            ("modules.json", r#"[{"path":"../../etc","type":"sentence_transformers.models.Dense"}]"#)]);
        let err = walk(&mut Folder(dir.path())).unwrap_err().to_string();
        assert!(err.contains("modules.json") && err.contains("../../etc"), "{err}");
        let dir = folder(&[("config.json", "{}"), ("tokenizer.json", "{}"),
            ("model.safetensors.index.json", r#"{"weight_map":{"a":"/abs/model.safetensors"}}"#)]);
        let err = walk(&mut Folder(dir.path())).unwrap_err().to_string();
        assert!(err.contains("/abs/model.safetensors"), "{err}");
    }
}
