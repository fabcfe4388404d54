//! Downloads from the hub through the `hf-hub` crate, into the shared cache.
//!
//! One call to the hub's model API (`/api/models/{repo}/revision/{rev}?blobs=true`) gives the
//! revision's commit and every file's size and hash (sha256 for LFS files, the git blob id for
//! others). Each needed file of that commit is downloaded by `hf-hub` (redirects to the CDN, a
//! `blobs/<etag>.part` file resumed after an interruption and renamed only when complete) and
//! then checked here against that size and hash; a file that fails the check is removed and
//! downloaded once more before the pull fails. A file already in the snapshot is checked instead
//! of downloaded.

use std::collections::HashMap;
use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use super::cache::{self, Digest, RepoCache};
use super::plan::{self, Store};
use super::progress::{Display, FileProgress};
use super::{HubRef, HubSettings, PullError, Resolved};

#[derive(Deserialize)]
struct Info {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl Sibling {
    /// The hash and size the file must have.
    fn expected(&self) -> Option<(Digest, Option<u64>)> {
        match (&self.lfs, &self.blob_id) {
            (Some(lfs), _) => Some((Digest::Sha256(lfs.sha256.to_ascii_lowercase()), Some(lfs.size))),
            (None, Some(id)) => Digest::from_etag(id).map(|d| (d, self.size)),
            (None, None) => None,
        }
    }
}

/// Context for turning transport errors into [`PullError`]s.
struct Ctx<'a> {
    settings: &'a HubSettings,
    r: &'a HubRef,
}

impl Ctx<'_> {
    fn api_error(&self, e: ApiError, what: &str) -> PullError {
        match e {
            ApiError::RequestError(e) => self.http_error(*e, what),
            ApiError::TooManyRetries(e) => self.api_error(*e, what),
            // A transfer cut off mid-body surfaces as an I/O error of the copy.
            ApiError::IoError(e) if is_transport(&e) => {
                PullError::Network { endpoint: self.settings.endpoint.clone(), message: format!("{what}: {e}") }
            }
            ApiError::IoError(e) => PullError::io(&self.settings.cache_dir, e),
            ApiError::LockAcquisition(path) => {
                PullError::Other(format!("{what}: another download of this file is under way ({} is locked)", path.display()))
            }
            other => PullError::Other(format!("{what}: {other}")),
        }
    }

    fn http_error(&self, e: ureq::Error, what: &str) -> PullError {
        let repo = self.r.repo.clone();
        match e {
            ureq::Error::StatusCode(status @ (401 | 403)) if self.settings.token.is_none() => PullError::NoToken { repo, status },
            ureq::Error::StatusCode(status @ (401 | 403)) => PullError::Refused { repo, status },
            ureq::Error::StatusCode(404) => PullError::NotFound { what: what.into() },
            ureq::Error::StatusCode(status) => PullError::Http { url: what.into(), status },
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => PullError::DiskFull { path: self.settings.cache_dir.clone() },
            other => PullError::Network { endpoint: self.settings.endpoint.clone(), message: other.to_string() },
        }
    }
}

fn is_transport(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    e.get_ref().is_some_and(|inner| inner.is::<ureq::Error>())
        || matches!(e.kind(), K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::TimedOut | K::BrokenPipe)
}

fn api(settings: &HubSettings) -> Result<Api, PullError> {
    ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(false)
        .with_retries(3)
        .with_user_agent("mlx-embed", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| PullError::Other(format!("cannot set up the hub client: {e}")))
}

/// The revision's files as the hub lists them.
struct Remote<'a> {
    ctx: Ctx<'a>,
    repo: ApiRepo,
    cache: RepoCache,
    commit: String,
    files: HashMap<String, Sibling>,
    display: Display,
}

impl Store for Remote<'_> {
    fn has(&mut self, file: &str) -> Result<bool, PullError> {
        let has = self.files.contains_key(file);
        if !has {
            self.cache.mark_absent(&self.commit, file)?;
        }
        Ok(has)
    }

    fn fetch(&mut self, file: &str) -> Result<PathBuf, PullError> {
        let sibling = &self.files[file];
        let target = self.cache.snapshot(&self.commit).join(file);
        let expected = sibling.expected();
        if target.exists() {
            match self.check(&target, file, &expected) {
                Ok(()) => return Ok(target),
                Err(e) => {
                    tracing::warn!(repo = %self.ctx.r.repo, file, error = %e, "cached file is damaged: downloading it again");
                    cache::remove_snapshot_file(&target);
                }
            }
        } else if std::fs::symlink_metadata(&target).is_ok() {
            let _ = std::fs::remove_file(&target); // a link to a removed blob
        }
        if let Some((digest, Some(size))) = &expected {
            // hf-hub resumes a `.part` file from its length: one as long as the file (killed before
            // the rename) would ask for an empty range, a longer one can only be wrong.
            let part = self.cache.blobs().join(format!("{}.part", digest.hex()));
            if std::fs::metadata(&part).is_ok_and(|m| m.len() >= *size) {
                let _ = std::fs::remove_file(&part);
            }
        }
        let what = format!("{}/{file} at {}", self.ctx.r.repo, self.ctx.r.revision);
        for attempt in 0..2 {
            let progress = FileProgress::new(self.display, &self.ctx.r.repo, file);
            let got = self.repo.download_with_progress(file, progress).map_err(|e| self.ctx.api_error(e, &what));
            if self.commit != self.ctx.r.revision {
                self.cache.drop_ref(&self.commit);
            }
            let got = got?;
            if got != target {
                // Fetched by commit id, the file can only land in that commit's snapshot.
                return Err(PullError::Other(format!("{what}: the hub answered for another commit ({})", got.display())));
            }
            match self.check(&target, file, &expected) {
                Ok(()) => return Ok(target),
                Err(e) => {
                    cache::remove_snapshot_file(&target);
                    if attempt == 1 {
                        return Err(e);
                    }
                    tracing::warn!(repo = %self.ctx.r.repo, file, error = %e, "downloaded file failed its check: downloading it again");
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn name(&self) -> &str {
        &self.ctx.r.repo
    }
}

impl Remote<'_> {
    /// Size and hash against the hub's listing; without one, against the blob's name.
    fn check(&self, path: &std::path::Path, file: &str, expected: &Option<(Digest, Option<u64>)>) -> Result<(), PullError> {
        let Some((digest, size)) = expected else {
            return cache::check_snapshot_file(path, file);
        };
        let actual = std::fs::metadata(path).map_err(|e| PullError::io(path, e))?.len();
        if let Some(size) = size.filter(|s| *s != actual) {
            return Err(PullError::Integrity { file: file.into(), expected: format!("{size} bytes"), actual: format!("{actual} bytes") });
        }
        digest.check(path, file)
    }
}

/// Resolves `r` on the hub and downloads the files of [`plan::walk`] the cache lacks.
pub fn pull(settings: &HubSettings, r: &HubRef, display: Display) -> Result<Resolved, PullError> {
    if settings.offline {
        return super::cached(settings, r, true);
    }
    let ctx = Ctx { settings, r };
    let api = api(settings)?;
    let what = format!("{}@{}", r.repo, r.revision);
    let listing = api.repo(Repo::with_revision(r.repo.clone(), RepoType::Model, r.revision.clone()));
    let mut response = listing.info_request().query("blobs", "true").call().map_err(|e| ctx.http_error(e, &what))?;
    let info: Info = response.body_mut().read_json()
        .map_err(|e| PullError::Other(format!("{what}: unexpected answer from the hub's model API: {e}")))?;
    if !super::is_commit(&info.sha) {
        return Err(PullError::Other(format!("{what}: the hub's model API gave no commit id")));
    }
    let cache = RepoCache::new(&settings.cache_dir, &r.repo);
    let files = info.siblings.into_iter().map(|s| (s.rfilename.clone(), s)).collect();
    // Files are fetched by commit id, so they all come from the commit listed even if the branch
    // moves meanwhile. hf-hub then writes `refs/<commit id>` after each file: it is removed (after
    // each file, and at the end), and `refs/<revision>` moves only once the copy is complete (a
    // failed pull of a newer commit leaves the branch on the last complete one).
    let repo = api.repo(Repo::with_revision(r.repo.clone(), RepoType::Model, info.sha.clone()));
    let mut remote = Remote { ctx, repo, cache, commit: info.sha.clone(), files, display };
    let walked = plan::walk(&mut remote);
    if info.sha != r.revision {
        remote.cache.drop_ref(&info.sha);
    }
    let files = walked?;
    remote.cache.set_ref(&r.revision, &info.sha)?;
    tracing::info!(source = %r, commit = %info.sha, files = files.len(), "model files are in the cache");
    Ok(Resolved { dir: remote.cache.snapshot(&info.sha), commit: Some(info.sha), files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_become_reasons_an_operator_can_act_on() {
        let settings = HubSettings { endpoint: "http://hub".into(), cache_dir: "/cache".into(), token: None, offline: false };
        let r = HubRef::parse("org/m").unwrap();
        let ctx = Ctx { settings: &settings, r: &r };
        let full = ctx.api_error(ApiError::IoError(std::io::ErrorKind::StorageFull.into()), "org/m");
        assert!(matches!(full, PullError::DiskFull { .. }) && full.to_string() == "/cache: disk full", "{full}");
        let cut = ctx.api_error(ApiError::IoError(std::io::ErrorKind::UnexpectedEof.into()), "org/m/model.safetensors");
        assert!(matches!(cut, PullError::Network { .. }) && cut.to_string().contains("model.safetensors"), "{cut}");
        let retried = ctx.api_error(ApiError::TooManyRetries(Box::new(ApiError::RequestError(Box::new(ureq::Error::StatusCode(500))))), "f");
        assert!(matches!(retried, PullError::Http { status: 500, .. }), "{retried}");
        assert!(matches!(ctx.http_error(ureq::Error::StatusCode(401), "x"), PullError::NoToken { status: 401, .. }));
        assert!(matches!(ctx.http_error(ureq::Error::StatusCode(404), "x"), PullError::NotFound { .. }));
        assert!(matches!(ctx.http_error(ureq::Error::ConnectionFailed, "x"), PullError::Network { .. }));
        let with_token = HubSettings { token: Some("t".into()), ..settings.clone() };
        let ctx = Ctx { settings: &with_token, r: &r };
        assert!(matches!(ctx.http_error(ureq::Error::StatusCode(403), "x"), PullError::Refused { status: 403, .. }));
    }
}
