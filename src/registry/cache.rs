//! The hub cache on disk, in `huggingface_hub`'s layout:
//!
//! ```text
//! models--org--name/
//!   refs/main                 the commit a branch or tag pointed to at the last download
//!   snapshots/<commit>/file   a relative symlink into blobs/
//!   blobs/<etag>              the content, named by the hub's ETag: the sha256 of an LFS file,
//!                             the git blob id (sha1) of any other file
//!   .no_exist/<commit>/file   the revision has no such file (so a copy is known to be complete)
//! ```
//!
//! Because blobs are named by their hash, a cached file can be checked without the network.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use super::plan::{self, Store};
use super::{HubRef, HubSettings, PullError, Resolved};

/// One repository's folder in the cache.
pub struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &str) -> RepoCache {
        RepoCache { root: cache_dir.join(format!("models--{}", repo.replace('/', "--"))) }
    }

    /// The commit `revision` resolves to in the cache, if known.
    pub fn commit(&self, revision: &str) -> Option<String> {
        if super::is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| super::is_commit(c))
    }

    /// Records that `revision` (a branch or tag) points at `commit`. A commit needs no ref (a
    /// download by commit id may have left one named by the id: it is removed, as Python's tools
    /// never write such refs).
    pub fn set_ref(&self, revision: &str, commit: &str) -> Result<(), PullError> {
        if super::is_commit(revision) {
            self.drop_ref(revision);
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        write_atomic(&path, commit.as_bytes())
    }

    /// Removes a ref named by a commit id (hf-hub writes one when asked for a commit).
    pub fn drop_ref(&self, commit: &str) {
        let _ = std::fs::remove_file(self.root.join("refs").join(commit));
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    fn absent_marker(&self, commit: &str, file: &str) -> PathBuf {
        self.root.join(".no_exist").join(commit).join(file)
    }

    /// Records that the revision has no `file`.
    pub fn mark_absent(&self, commit: &str, file: &str) -> Result<(), PullError> {
        write_atomic(&self.absent_marker(commit, file), b"")
    }

    pub fn is_marked_absent(&self, commit: &str, file: &str) -> bool {
        self.absent_marker(commit, file).exists()
    }
}

fn write_atomic(path: &Path, content: &[u8]) -> Result<(), PullError> {
    let parent = path.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(parent).map_err(|e| PullError::io(parent, e))?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{}.{}-{n}.tmp", path.file_name().and_then(|f| f.to_str()).unwrap_or("f"), std::process::id()));
    std::fs::write(&tmp, content).map_err(|e| PullError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PullError::io(path, e))
}

/// A content hash as the hub names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    /// sha256 of the content (LFS files).
    Sha256(String),
    /// git's blob id: sha1 of `blob <len>\0` and the content (other files).
    GitSha1(String),
}

impl Digest {
    /// The digest a blob's name (the hub's ETag) stands for, if it is one.
    pub fn from_etag(etag: &str) -> Option<Digest> {
        let etag = etag.trim_matches('"').to_ascii_lowercase();
        if !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match etag.len() {
            64 => Some(Digest::Sha256(etag)),
            40 => Some(Digest::GitSha1(etag)),
            _ => None,
        }
    }

    pub fn hex(&self) -> &str {
        match self {
            Digest::Sha256(h) | Digest::GitSha1(h) => h,
        }
    }

    /// This kind of digest of the file at `path`.
    pub fn of_file(&self, path: &Path) -> Result<String, PullError> {
        let mut f = std::fs::File::open(path).map_err(|e| PullError::io(path, e))?;
        let len = f.metadata().map_err(|e| PullError::io(path, e))?.len();
        let mut buf = vec![0u8; 1 << 20];
        let mut feed = |update: &mut dyn FnMut(&[u8])| -> Result<(), PullError> {
            loop {
                let n = f.read(&mut buf).map_err(|e| PullError::io(path, e))?;
                if n == 0 {
                    return Ok(());
                }
                update(&buf[..n]);
            }
        };
        let hex = match self {
            Digest::Sha256(_) => {
                let mut h = Sha256::new();
                feed(&mut |b| h.update(b))?;
                hex(&h.finalize())
            }
            Digest::GitSha1(_) => {
                let mut h = Sha1::new();
                h.update(format!("blob {len}\0").as_bytes());
                feed(&mut |b| h.update(b))?;
                hex(&h.finalize())
            }
        };
        Ok(hex)
    }

    /// Checks the file at `path`; `name` is the repository file, for the error.
    pub fn check(&self, path: &Path, name: &str) -> Result<(), PullError> {
        let actual = self.of_file(path)?;
        if actual != self.hex() {
            return Err(PullError::Integrity { file: name.into(), expected: self.hex().into(), actual });
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a snapshot file against the hash its blob is named by (files that are not symlinks
/// into `blobs/`, e.g. copied by hand, cannot be checked and pass).
pub fn check_snapshot_file(path: &Path, name: &str) -> Result<(), PullError> {
    let blob = std::fs::canonicalize(path).map_err(|e| PullError::io(path, e))?;
    let is_blob = blob.parent().and_then(Path::file_name).is_some_and(|d| d == "blobs");
    match blob.file_name().and_then(|n| n.to_str()).and_then(Digest::from_etag) {
        Some(d) if is_blob => d.check(&blob, name),
        _ => Ok(()),
    }
}

/// Removes a snapshot file and the blob it points to (after a failed check).
pub fn remove_snapshot_file(path: &Path) {
    if let Ok(blob) = std::fs::canonicalize(path) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(path);
}

/// The cached copy of one commit, seen through [`Store`]. A link to a missing blob makes the copy
/// incomplete. A file neither in the snapshot nor recorded as absent is incomplete when `strict`;
/// otherwise it is taken as absent (a copy made by other tools may not record absent files), and
/// noted: when the walk then misses a file the model needs, the copy is incomplete.
struct Snapshot<'a> {
    cache: &'a RepoCache,
    r: &'a HubRef,
    commit: String,
    verify: bool,
    offline: bool,
    strict: bool,
    unknown: Vec<String>,
}

impl Store for Snapshot<'_> {
    fn has(&mut self, file: &str) -> Result<bool, PullError> {
        let path = self.cache.snapshot(&self.commit).join(file);
        if path.exists() {
            Ok(true)
        } else if std::fs::symlink_metadata(&path).is_ok() || self.strict && !self.cache.is_marked_absent(&self.commit, file) {
            Err(self.incomplete(file))
        } else {
            if !self.cache.is_marked_absent(&self.commit, file) {
                self.unknown.push(file.to_string());
            }
            Ok(false)
        }
    }

    fn fetch(&mut self, file: &str) -> Result<PathBuf, PullError> {
        let path = self.cache.snapshot(&self.commit).join(file);
        if !path.exists() {
            return Err(self.incomplete(file));
        }
        if self.verify {
            check_snapshot_file(&path, file)?;
        }
        Ok(path)
    }

    fn name(&self) -> &str {
        &self.r.repo
    }
}

impl Snapshot<'_> {
    fn incomplete(&self, file: &str) -> PullError {
        PullError::Incomplete { repo: self.r.repo.clone(), revision: self.r.revision.clone(), file: file.into(), offline: self.offline }
    }
}

/// The complete cached copy of `r`, checked file by file when `verify`; with `strict`, every
/// file the model may need must be cached or recorded as absent.
pub fn resolve(settings: &HubSettings, r: &HubRef, verify: bool, strict: bool) -> Result<Resolved, PullError> {
    let cache = RepoCache::new(&settings.cache_dir, &r.repo);
    let commit = cache.commit(&r.revision).filter(|c| cache.snapshot(c).is_dir()).ok_or_else(|| PullError::NotCached {
        repo: r.repo.clone(),
        revision: r.revision.clone(),
        cache: settings.cache_dir.clone(),
        offline: settings.offline,
    })?;
    let mut store = Snapshot { cache: &cache, r, commit: commit.clone(), verify, offline: settings.offline, strict, unknown: vec![] };
    let files = match plan::walk(&mut store) {
        Err(PullError::Missing { file, .. }) if store.unknown.contains(&file) => return Err(store.incomplete(&file)),
        other => other?,
    };
    if !store.unknown.is_empty() {
        tracing::warn!(source = %r, files = ?store.unknown, "optional files neither cached nor known to be absent: taken as absent");
    }
    Ok(Resolved { dir: cache.snapshot(&commit), commit: Some(commit), files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_hub_naming() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "hello\n").unwrap();
        // `git hash-object` and `sha256sum` of "hello\n".
        let git = Digest::from_etag("\"ce013625030ba8dba906f756967f9e9ca394464a\"").unwrap();
        assert_eq!(git.of_file(&p).unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
        let sha = Digest::from_etag("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03").unwrap();
        sha.check(&p, "f").unwrap();
        std::fs::write(&p, "hellO\n").unwrap();
        assert!(matches!(sha.check(&p, "f"), Err(PullError::Integrity { .. })));
        assert_eq!(Digest::from_etag("W/\"abc\""), None);
    }

    #[test]
    fn refs_resolve_branches_and_commits_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "org/name");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(cache.commit("main"), None);
        cache.set_ref("main", commit).unwrap();
        cache.set_ref("refs/pr/1", commit).unwrap();
        assert_eq!(cache.commit("main").as_deref(), Some(commit));
        assert_eq!(cache.commit("refs/pr/1").as_deref(), Some(commit));
        assert_eq!(cache.commit(commit).as_deref(), Some(commit));
        assert!(dir.path().join("models--org--name/refs/main").is_file());
    }
}
