//! Model sources: a local folder, or a Hugging Face hub repository resolved to a local folder.
//!
//! Hub models live in the cache layout of Python's `huggingface_hub` (`blobs/`, `snapshots/`,
//! `refs/`, `.no_exist/` under `models--org--name`), so this service and Python tools share
//! downloads. A server start uses a complete, checked copy from the cache without asking the hub
//! (so it starts offline); `mlx-embed pull` asks the hub for the revision's current commit.
//!
//! - [`plan`]: which files a model needs. One walk serves a local folder, the cache and the hub.
//! - [`cache`]: the cache on disk: revisions, snapshots, content checks.
//! - [`hub`]: downloads through the `hf-hub` crate, checked against the hub's sizes and hashes.
//! - [`progress`]: per-file progress as bars, plain lines or log lines.
//! - [`background`]: the server's start-up fetches, retried with backoff while it serves.

pub mod background;
pub mod cache;
pub mod hub;
pub mod plan;
pub mod progress;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use progress::Display;

/// How to reach the hub and where its cache is, from the variables Python's `huggingface_hub`
/// reads (see [`HubSettings::from_vars`]).
#[derive(Clone)]
pub struct HubSettings {
    pub endpoint: String,
    /// The hub cache (`$HF_HUB_CACHE`, by default `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Sent as `Authorization: Bearer …`; never printed.
    pub token: Option<String>,
    /// Never contact the hub; use only what the cache holds.
    pub offline: bool,
}

impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubSettings {
    pub const DEFAULT_ENDPOINT: &'static str = "https://huggingface.co";

    /// Settings from environment variables, looked up through `var`:
    /// `HF_ENDPOINT`; `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`
    /// with `HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`;
    /// `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`), else the file at `HF_TOKEN_PATH` or
    /// `$HF_HOME/token` that `hf auth login` writes; `HF_HUB_OFFLINE` (1, true, yes or on).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubSettings {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(set("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = set("HF_TOKEN").or_else(|| set("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = set("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
            std::fs::read_to_string(path).ok()
        });
        let token = token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        let offline = set("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"));
        let endpoint = set("HF_ENDPOINT").unwrap_or_else(|| Self::DEFAULT_ENDPOINT.into());
        HubSettings { endpoint: endpoint.trim_end_matches('/').to_string(), cache_dir, token, offline }
    }
}

/// A hub repository at a revision (branch, tag or commit), as written `hf://org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
}

impl HubRef {
    pub const DEFAULT_REVISION: &'static str = "main";

    /// Parses `org/name[@revision]` (without `hf://`), checking the repository id's shape.
    pub fn parse(s: &str) -> Result<HubRef, String> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (s, Self::DEFAULT_REVISION),
        };
        let part_ok = |p: &str| {
            !p.is_empty() && !p.starts_with(['.', '-']) && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
            return Err(format!("`{repo}` is not a hub repository id (org/name, letters, digits, `.`, `_`, `-`)"));
        }
        if revision.is_empty() || revision.contains("..") || revision.starts_with('/')
            || revision.chars().any(|c| c.is_whitespace() || matches!(c, '#' | '?' | '%' | '\\'))
        {
            return Err(format!("`{revision}` is not a usable revision"));
        }
        // Commit ids are lowercase on the hub and in the cache.
        let revision = if is_commit(revision) { revision.to_ascii_lowercase() } else { revision.to_string() };
        Ok(HubRef { repo: repo.to_string(), revision })
    }

    /// Whether the revision is a full commit id (it then needs no ref to resolve).
    pub fn is_commit(&self) -> bool {
        is_commit(&self.revision)
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf://{}", self.repo)?;
        if self.revision != Self::DEFAULT_REVISION {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A model's files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The folder the model loads from (a snapshot folder for hub models).
    pub dir: PathBuf,
    /// The commit the files come from (hub models only).
    pub commit: Option<String>,
    /// The files the model needs, relative to `dir`.
    pub files: Vec<String>,
}

impl Resolved {
    /// Bytes on disk of the files the model needs (each distinct file counted once).
    pub fn size_on_disk(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.files.iter()
            .filter_map(|f| std::fs::canonicalize(self.dir.join(f)).ok())
            .filter(|p| seen.insert(p.clone()))
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Where a configured model comes from and, once known, the files it loaded.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The source as configured (a folder, or `hf://org/name[@revision]`).
    pub source: String,
    pub resolved: Arc<OnceLock<Resolved>>,
}

impl Origin {
    pub fn new(source: String) -> Origin {
        Origin { source, resolved: Arc::new(OnceLock::new()) }
    }
}

/// Why a model's files could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{repo}: the hub answered {status}: the repository does not exist, or it is private or gated and needs a token: \
             set HF_TOKEN (or run `hf auth login`) for an account that has accepted the model's terms")]
    NoToken { repo: String, status: u16 },
    #[error("{repo}: the hub refused the token ({status}): for a gated model, accept its terms on the model's page with the \
             account of HF_TOKEN; otherwise check that HF_TOKEN is valid")]
    Refused { repo: String, status: u16 },
    #[error("{what}: not found on the hub (404)")]
    NotFound { what: String },
    #[error("{url}: the hub answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{endpoint}: network error: {message}")]
    Network { endpoint: String, message: String },
    #[error("{}: disk full", path.display())]
    DiskFull { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{file}: content does not match the hub's checksum (expected {expected}, got {actual})")]
    Integrity { file: String, expected: String, actual: String },
    #[error("{repo}@{revision}: not in the cache at {}{}", cache.display(), offline_hint(*.offline))]
    NotCached { repo: String, revision: String, cache: PathBuf, offline: bool },
    #[error("{repo}@{revision}: the cached copy is incomplete: {file} is missing{}", offline_hint(*.offline))]
    Incomplete { repo: String, revision: String, file: String, offline: bool },
    #[error("{repo} has no `{file}`, which the model needs")]
    Missing { repo: String, file: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{0}")]
    Other(String),
}

fn offline_hint(offline: bool) -> &'static str {
    if offline {
        " (HF_HUB_OFFLINE is set: run `mlx-embed pull` where the hub is reachable)"
    } else {
        ""
    }
}

impl PullError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> PullError {
        if e.kind() == std::io::ErrorKind::StorageFull {
            PullError::DiskFull { path: path.to_path_buf() }
        } else {
            PullError::Io { path: path.to_path_buf(), source: e }
        }
    }
}

/// A complete copy of `r` from the cache, with every file's content checked when `verify`.
/// Optional files neither cached nor recorded as absent (copies made by other tools record no
/// absent files) are taken as absent.
pub fn cached(settings: &HubSettings, r: &HubRef, verify: bool) -> Result<Resolved, PullError> {
    cache::resolve(settings, r, verify, false)
}

/// Asks the hub for the commit `r` names now and downloads the files the cache lacks.
pub fn pull(settings: &HubSettings, r: &HubRef, display: Display) -> Result<Resolved, PullError> {
    hub::pull(settings, r, display)
}

/// What a server start needs: the cached copy when it is complete and intact, else a download
/// (unless offline). A damaged cached file is downloaded again.
///
/// Online, a cached copy must be provably complete (an optional file neither cached nor recorded
/// as absent sends the start to the hub, which settles it); offline, such files are taken as
/// absent.
pub fn resolve(settings: &HubSettings, r: &HubRef, display: Display) -> Result<Resolved, PullError> {
    match cache::resolve(settings, r, true, !settings.offline) {
        Ok(found) => Ok(found),
        Err(e) if settings.offline => Err(e),
        Err(e) => {
            tracing::info!(source = %r, reason = %e, "downloading from the hub");
            pull(settings, r, display)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> HubSettings {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubSettings::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn settings_follow_the_python_tools_defaults_and_overrides() {
        let s = settings(&[("HOME", "/home/u")]);
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(s.endpoint, "https://huggingface.co");
        assert!(!s.offline && s.token.is_none());
        let s = settings(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(s.cache_dir, PathBuf::from("/x/huggingface/hub"));
        let s = settings(&[("HF_HOME", "/hf"), ("HF_ENDPOINT", "http://127.0.0.1:9/"), ("HF_HUB_OFFLINE", "true"), ("HF_TOKEN", " t0k \n")]);
        assert_eq!(s.cache_dir, PathBuf::from("/hf/hub"));
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        assert!(s.offline);
        assert_eq!(s.token.as_deref(), Some("t0k"));
        let s = settings(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c"), ("HF_HUB_OFFLINE", "0")]);
        assert_eq!(s.cache_dir, PathBuf::from("/c"));
        assert!(!s.offline);
    }

    #[test]
    fn the_token_file_is_read_when_no_variable_is_set_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_secret\n").unwrap();
        let s = settings(&[("HF_HOME", dir.path().to_str().unwrap())]);
        assert_eq!(s.token.as_deref(), Some("hf_secret"));
        assert!(!format!("{s:?}").contains("hf_secret"));
    }

    #[test]
    fn hub_references_parse_with_a_default_revision_and_bad_ids_are_refused() {
        assert_eq!(HubRef::parse("Qwen/Qwen3-Embedding-0.6B").unwrap(), HubRef { repo: "Qwen/Qwen3-Embedding-0.6B".into(), revision: "main".into() });
        let r = HubRef::parse("google/embeddinggemma-300m@v1.0").unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("google/embeddinggemma-300m", "v1.0"));
        assert_eq!(r.to_string(), "hf://google/embeddinggemma-300m@v1.0");
        assert!(HubRef::parse("gpt2").is_ok());
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c", "org/", "a/b@", "a/b@x y"] {
            assert!(HubRef::parse(bad).is_err(), "{bad}");
        }
        assert!(HubRef::parse(&format!("a/b@{}", "0123456789abcdef0123456789abcdef01234567")).unwrap().is_commit());
        assert_eq!(HubRef::parse("a/b@0123456789ABCDEF0123456789abcdef01234567").unwrap().revision, "0123456789abcdef0123456789abcdef01234567");
        for bad in ["a/b@x#y", "a/b@x?y", "a/b@100%"] {
            assert!(HubRef::parse(bad).is_err(), "{bad}");
        }
    }
}
