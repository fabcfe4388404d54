//! The server's start-up fetches of hub models. Each repository (at a revision) is fetched once,
//! on its own thread, for every model that uses it, while the server already answers (health,
//! the other models): the cached copy when complete, else a download. On failure the reason is
//! logged and noted on the models (GetModel shows it; health says NOT_SERVING) and the fetch is
//! tried again after 2 s, 4 s, … up to 5 minutes between tries.

use std::time::{Duration, Instant};

use super::{Display, HubRef, HubSettings, Origin};
use crate::engine::EngineHandle;

const FIRST_RETRY: Duration = Duration::from_secs(2);
const LAST_RETRY: Duration = Duration::from_secs(300);

/// Fetches `r` on a new thread, then hands the folder to each of the engine's `models` (with its
/// origin) that uses it.
pub fn spawn(engine: EngineHandle, models: Vec<(usize, Origin)>, r: HubRef, settings: HubSettings) {
    std::thread::Builder::new()
        .name(format!("fetch-{}", r.repo))
        .spawn(move || fetch(&engine, &models, &r, &settings))
        .expect("spawning a fetch thread");
}

fn fetch(engine: &EngineHandle, models: &[(usize, Origin)], r: &HubRef, settings: &HubSettings) {
    let names: Vec<&str> = models.iter().filter_map(|(i, _)| engine.model_names().nth(*i)).collect();
    let names = names.join(", ");
    let mut delay = FIRST_RETRY;
    while !engine.is_stopped() {
        match super::resolve(settings, r, Display::Log) {
            Ok(found) => {
                tracing::info!(models = %names, source = %r, commit = found.commit.as_deref().unwrap_or(""),
                    dir = %found.dir.display(), "model files ready");
                for (i, origin) in models {
                    let _ = origin.resolved.set(found.clone());
                    let _ = engine.provide(*i, found.dir.clone());
                }
                return;
            }
            Err(e) => {
                tracing::error!(models = %names, source = %r, error = %e, retry_in_secs = delay.as_secs(), "cannot fetch the model's files");
                for (i, _) in models {
                    engine.note_download(*i, Some(format!("{e} (next try in {} s)", delay.as_secs())));
                }
                let until = Instant::now() + delay;
                while Instant::now() < until && !engine.is_stopped() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                delay = (delay * 2).min(LAST_RETRY);
            }
        }
    }
}
