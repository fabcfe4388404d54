//! The server's start-up fetches of hub models, one thread per repository, while the server
//! already answers (health, the other models). Each revision of the repository the config names
//! is fetched once for every model that uses it: the cached copy when complete, else a download.
//! On failure the reason is logged and noted on the models (GetModel shows it; health says
//! NOT_SERVING) and the fetch is tried again after 2 s, 4 s, … up to 5 minutes between tries.
//! One thread per repository keeps two fetches from writing the same files at once.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::{Display, HubRef, HubSettings, Origin, PullError, Resolved};
use crate::engine::EngineHandle;

const FIRST_RETRY: Duration = Duration::from_secs(2);
const LAST_RETRY: Duration = Duration::from_secs(300);

/// One revision to fetch and the engine's models (with their origins) that use it.
pub struct Wanted {
    pub r: HubRef,
    pub models: Vec<(usize, Origin)>,
}

/// Fetches every revision of one repository on a new thread, handing each folder to the engine.
pub fn spawn(engine: EngineHandle, repo: String, wanted: Vec<Wanted>, settings: HubSettings) {
    std::thread::Builder::new()
        .name(format!("fetch-{repo}"))
        .spawn(move || fetch(&engine, wanted, &settings))
        .expect("spawning a fetch thread");
}

fn fetch(engine: &EngineHandle, mut wanted: Vec<Wanted>, settings: &HubSettings) {
    let mut delay = FIRST_RETRY;
    while !engine.is_stopped() {
        wanted.retain(|w| !try_once(engine, w, settings, delay));
        if wanted.is_empty() {
            return;
        }
        let until = Instant::now() + delay;
        while Instant::now() < until && !engine.is_stopped() {
            std::thread::sleep(Duration::from_millis(100));
        }
        delay = (delay * 2).min(LAST_RETRY);
    }
}

/// One attempt; true once the models have their files.
fn try_once(engine: &EngineHandle, w: &Wanted, settings: &HubSettings, delay: Duration) -> bool {
    let names: Vec<&str> = w.models.iter().filter_map(|(i, _)| engine.model_names().nth(*i)).collect();
    let names = names.join(", ");
    let result = catch_unwind(AssertUnwindSafe(|| super::resolve(settings, &w.r, Display::Log)))
        .unwrap_or_else(|_| Err(PullError::Other(format!("{}: the download panicked", w.r))));
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(crate::metrics::PULLS, "source" => w.r.to_string(), "result" => outcome).increment(1);
    match result {
        Ok(found) => {
            tracing::info!(models = %names, source = %w.r, commit = found.commit.as_deref().unwrap_or(""),
                dir = %found.dir.display(), "model files ready");
            provide(engine, w, found);
            true
        }
        Err(e) => {
            tracing::error!(models = %names, source = %w.r, error = %e, retry_in_secs = delay.as_secs(), "cannot fetch the model's files");
            for (i, _) in &w.models {
                engine.note_download(*i, Some(format!("{e} (next try in {} s)", delay.as_secs())));
            }
            false
        }
    }
}

fn provide(engine: &EngineHandle, w: &Wanted, found: Resolved) {
    for (i, origin) in &w.models {
        let _ = origin.resolved.set(found.clone());
        let _ = engine.provide(*i, found.dir.clone());
    }
}
