//! `grpc.health.v1.Health`: `""` for the server, one name per model, set through a
//! [`HealthReporter`] as with tonic-health, whose generated server and messages this uses.
//!
//! The service is ours because tonic-health's Watch ends with NOT_FOUND for a name it does not
//! know, where the health protocol says to send SERVICE_UNKNOWN, keep the stream open, and send
//! the real status should the name appear. Check of an unknown name is NOT_FOUND in both.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::ServingStatus;

/// A reporter and the service it drives; `""` starts SERVING, as in tonic-health.
pub fn health_reporter() -> (HealthReporter, HealthServer<HealthService>) {
    let names = Arc::new(Names { statuses: Mutex::default(), added: watch::Sender::new(()) });
    let reporter = HealthReporter { names: Arc::clone(&names) };
    reporter.set(String::new(), ServingStatus::Serving);
    (reporter, HealthServer::new(HealthService { names }))
}

/// Sets the statuses the service answers with; clones share them.
#[derive(Clone)]
pub struct HealthReporter {
    names: Arc<Names>,
}

struct Names {
    /// Each known name's status. Names are never removed: they are fixed by the config. Held only
    /// for lookups and inserts, never across an await.
    statuses: Mutex<HashMap<String, watch::Sender<Wire>>>,
    /// Sent after a name is added, so streams watching a name not known yet look again.
    added: watch::Sender<()>,
}

impl Names {
    fn statuses(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Wire>>> {
        // A panic elsewhere cannot leave the map half-written (each change is one insert or send).
        self.statuses.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HealthReporter {
    /// Sets `name`'s status, adding the name if new; its watchers get the change. Async like
    /// tonic-health's, so callers read the same either way.
    pub async fn set_service_status(&self, name: impl AsRef<str>, status: ServingStatus) {
        self.set(name.as_ref().to_string(), status);
    }

    fn set(&self, name: String, status: ServingStatus) {
        let mut statuses = self.names.statuses();
        match statuses.get(&name) {
            Some(tx) => {
                tx.send_replace(status.into());
            }
            None => {
                statuses.insert(name, watch::Sender::new(status.into()));
                drop(statuses);
                self.names.added.send_replace(());
            }
        }
    }
}

pub struct HealthService {
    names: Arc<Names>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let status = self.names.statuses().get(&req.get_ref().service).map(|tx| *tx.borrow());
        match status {
            Some(status) => Ok(Response::new(HealthCheckResponse { status: status as i32 })),
            None => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let watching = Watching {
            // Subscribed before the first lookup, so a name added in between is not missed.
            added: self.names.added.subscribe(),
            names: Arc::clone(&self.names),
            name: req.into_inner().service,
            status: None,
            sent: None,
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(watching, Watching::next))))
    }
}

/// One Watch call: the name, its status once known, and the last status sent.
struct Watching {
    names: Arc<Names>,
    name: String,
    added: watch::Receiver<()>,
    status: Option<watch::Receiver<Wire>>,
    sent: Option<Wire>,
}

impl Watching {
    /// The next status to send: the current one when it differs from the last sent, else the next
    /// change. The stream lasts until the client or the server ends the call.
    async fn next(mut self) -> Option<(Result<HealthCheckResponse, Status>, Watching)> {
        loop {
            let now = match &mut self.status {
                Some(rx) => *rx.borrow_and_update(),
                None => match self.names.statuses().get(&self.name) {
                    Some(tx) => {
                        self.status = Some(tx.subscribe());
                        continue;
                    }
                    None => Wire::ServiceUnknown,
                },
            };
            if self.sent != Some(now) {
                self.sent = Some(now);
                return Some((Ok(HealthCheckResponse { status: now as i32 }), self));
            }
            let changed = match &mut self.status {
                Some(rx) => rx.changed().await,
                None => self.added.changed().await,
            };
            changed.ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn request(name: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest { service: name.into() })
    }

    async fn next_status(stream: &mut WatchStream) -> Option<i32> {
        let next = tokio::time::timeout(std::time::Duration::from_millis(100), stream.next()).await.ok()?;
        Some(next.expect("the stream is open").expect("a status").status)
    }

    #[tokio::test]
    async fn a_watched_name_not_known_yet_says_service_unknown_then_its_status_once_set() {
        let (reporter, server) = health_reporter();
        let service = HealthService { names: Arc::clone(&reporter.names) };
        drop(server);
        let mut stream = service.watch(request("later")).await.unwrap().into_inner();
        assert_eq!(next_status(&mut stream).await, Some(Wire::ServiceUnknown as i32));
        assert_eq!(next_status(&mut stream).await, None, "nothing more while the name is unknown");
        assert_eq!(service.check(request("later")).await.unwrap_err().code(), tonic::Code::NotFound);
        reporter.set_service_status("other", ServingStatus::Serving).await;
        assert_eq!(next_status(&mut stream).await, None, "another name does not concern this stream");
        reporter.set_service_status("later", ServingStatus::NotServing).await;
        assert_eq!(next_status(&mut stream).await, Some(Wire::NotServing as i32));
    }

    #[tokio::test]
    async fn watchers_see_each_change_once_and_a_drain_turns_every_name_not_serving() {
        let (reporter, _server) = health_reporter();
        let service = HealthService { names: Arc::clone(&reporter.names) };
        reporter.set_service_status("m", ServingStatus::NotServing).await;
        let mut server_stream = service.watch(request("")).await.unwrap().into_inner();
        let mut model_stream = service.watch(request("m")).await.unwrap().into_inner();
        assert_eq!(next_status(&mut server_stream).await, Some(Wire::Serving as i32));
        assert_eq!(next_status(&mut model_stream).await, Some(Wire::NotServing as i32));
        // A repeated status is not sent again.
        reporter.set_service_status("m", ServingStatus::NotServing).await;
        assert_eq!(next_status(&mut model_stream).await, None);
        reporter.set_service_status("m", ServingStatus::Serving).await;
        assert_eq!(next_status(&mut model_stream).await, Some(Wire::Serving as i32));
        for name in ["", "m"] {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        assert_eq!(next_status(&mut server_stream).await, Some(Wire::NotServing as i32));
        assert_eq!(next_status(&mut model_stream).await, Some(Wire::NotServing as i32));
        let checked = service.check(request("m")).await.unwrap().into_inner().status;
        assert_eq!(checked, Wire::NotServing as i32);
    }
}
