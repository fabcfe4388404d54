//! The server's start-up fetches of hub models. Each runs on its own thread while the server
//! already answers (health, the other models): the cached copy when complete, else a download;
//! on failure the reason is logged and noted on the model (GetModel shows it; health says
//! NOT_SERVING) and the fetch is tried again after 2 s, 4 s, … up to 5 minutes between tries.

use std::time::{Duration, Instant};

use super::{Display, HubRef, HubSettings, Origin};
use crate::engine::EngineHandle;

const FIRST_RETRY: Duration = Duration::from_secs(2);
const LAST_RETRY: Duration = Duration::from_secs(300);

/// Fetches `r` for the engine's model `model` on a new thread, then hands the folder over.
pub fn spawn(engine: EngineHandle, model: usize, r: HubRef, settings: HubSettings, origin: Origin) {
    let name = engine.model_names().nth(model).unwrap_or_default().to_string();
    std::thread::Builder::new()
        .name(format!("fetch-{name}"))
        .spawn(move || fetch(&engine, model, &name, &r, &settings, &origin))
        .expect("spawning a fetch thread");
}

fn fetch(engine: &EngineHandle, model: usize, name: &str, r: &HubRef, settings: &HubSettings, origin: &Origin) {
    let mut delay = FIRST_RETRY;
    while !engine.is_stopped() {
        match super::resolve(settings, r, Display::Log) {
            Ok(found) => {
                tracing::info!(model = name, source = %r, commit = found.commit.as_deref().unwrap_or(""),
                    dir = %found.dir.display(), "model files ready");
                let dir = found.dir.clone();
                let _ = origin.resolved.set(found);
                let _ = engine.provide(model, dir);
                return;
            }
            Err(e) => {
                tracing::error!(model = name, source = %r, error = %e, retry_in_secs = delay.as_secs(), "cannot fetch the model's files");
                engine.note_download(model, Some(format!("{e} (next try in {} s)", delay.as_secs())));
                let until = Instant::now() + delay;
                while Instant::now() < until && !engine.is_stopped() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                delay = (delay * 2).min(LAST_RETRY);
            }
        }
    }
}
