//! What each RPC leaves behind: its request id, its metrics (latency, status code, stage times)
//! and its log line, and the stage times in the response metadata, in milliseconds, under the
//! names text-embeddings-inference uses (`x-tokenization-time`, `x-queue-time`,
//! `x-inference-time`, plus `x-launch-time`, `x-serialization-time` and `x-total-time`). A call the client
//! abandons is recorded as CANCELLED when its handler is dropped, one dropped after its deadline
//! as DEADLINE_EXCEEDED. Calls answered without a handler (refused at admission or while their
//! message was read, or whose deadline passed first) are recorded by the layer in front of the
//! service through [`unhandled`], knowing from their [`Scope`] that no handler did.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::metrics;

/// Where an Embed request's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Texts in the request (the stages are empty without any).
    pub texts: usize,
    pub tokenize: Duration,
    pub queue: Duration,
    pub launch: Duration,
    pub inference: Duration,
    pub serialize: Duration,
}

impl Timings {
    /// Records the stage histograms of `model` (not for requests with only vectors: their
    /// stages are empty and would drag the stage percentiles to 0).
    pub fn record(&self, model: &str) {
        if self.texts == 0 {
            return;
        }
        let stages = [("tokenize", self.tokenize), ("queue", self.queue), ("launch", self.launch), ("inference", self.inference), ("serialize", self.serialize)];
        for (stage, d) in stages {
            ::metrics::histogram!(metrics::STAGE_DURATION, "model" => model.to_string(), "stage" => stage).record(d.as_secs_f64());
        }
    }
}

/// The request's id: the `x-request-id` metadata, else the id in the message, else a new one.
pub fn request_id<T>(req: &Request<T>, in_message: &str) -> String {
    let given = req.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
    let given = if given.is_empty() { in_message.trim() } else { given };
    if !given.is_empty() && given.len() <= 128 && given.bytes().all(|b| b.is_ascii_graphic()) {
        return given.to_string();
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
    });
    format!("{epoch:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

tokio::task_local! {
    /// The scope of the call whose handler is being polled. A task-local, because the handler's
    /// [`Call`] is made inside tonic's generated code, which hands nothing else down from the layer.
    static SCOPE: Arc<Scope>;
}

/// What the layer in front of the service knows of a call, for the [`Call`]s made while it runs:
/// the deadline (past it, a dropped call was cut by it rather than abandoned), the largest message
/// the call may answer with, and, back to the layer, whether a handler recorded the call.
pub struct Scope {
    deadline: Option<Instant>,
    max_message: usize,
    recorded: AtomicBool,
}

impl Scope {
    pub fn new(deadline: Option<Instant>, max_message: usize) -> Arc<Scope> {
        Arc::new(Scope { deadline, max_message, recorded: AtomicBool::new(false) })
    }

    /// `f` with this scope around every poll (and its drop).
    pub fn around<F: Future>(self: &Arc<Self>, f: F) -> impl Future<Output = F::Output> {
        SCOPE.scope(Arc::clone(self), f)
    }

    /// `f` run within this scope.
    pub fn around_sync<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        SCOPE.sync_scope(Arc::clone(self), f)
    }

    /// Whether a [`Call`] was started within this scope (it then records the call itself).
    pub fn recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }
}

/// Records a call of `rpc` answered with `code` before any handler ran (so its model is not
/// known).
pub fn unhandled(rpc: &'static str, code: tonic::Code, elapsed: Duration) {
    metrics::record_request(rpc, "unknown", code, elapsed);
    tracing::debug!(rpc, code = metrics::code_name(code), total_ms = %ms(elapsed), "answered before reaching the service");
}

/// An RPC in progress. [`Call::finish`] records its metrics, logs it and answers with the request
/// id and stage times in the metadata; a call dropped unfinished is recorded as CANCELLED (the
/// client cancelled or went away), or DEADLINE_EXCEEDED once its deadline has passed.
pub struct Call {
    rpc: &'static str,
    model: String,
    id: String,
    started: Instant,
    done: bool,
    scope: Option<Arc<Scope>>,
}

impl Call {
    pub fn start(rpc: &'static str, model: String, id: String) -> Call {
        let scope = SCOPE.try_with(Arc::clone).ok();
        if let Some(s) = &scope {
            s.recorded.store(true, Ordering::Release);
        }
        Call { rpc, model, id, started: Instant::now(), done: false, scope }
    }

    /// Records and answers `result`; an answer over the scope's message limit becomes
    /// RESOURCE_EXHAUSTED here, before it is counted (tonic would only find out while sending it,
    /// with OUT_OF_RANGE, after the headers had gone out).
    /// Records and answers a refusal: [`Call::finish`] for a call that has no answer to give.
    pub fn refuse(self, status: Status) -> Status {
        let unrecorded = status.clone();
        self.finish::<()>(Err(status)).err().unwrap_or(unrecorded)
    }

    pub fn finish<T: prost::Message>(mut self, result: Result<(T, Option<Timings>), Status>) -> Result<Response<T>, Status> {
        self.done = true;
        let total = self.started.elapsed();
        let limit = self.scope.as_ref().map_or(usize::MAX, |s| s.max_message);
        let result = match result {
            Ok((message, _)) if message.encoded_len() > limit => Err(Status::from(crate::error::Error::TooLarge(format!(
                "the response is too large: {} bytes, the limit (limits.max_message_bytes) is {limit} bytes", message.encoded_len()
            )))),
            r => r,
        };
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        metrics::record_request(self.rpc, &self.model, code, total);
        let (rpc, model, id) = (self.rpc, self.model.as_str(), self.id.as_str());
        match result {
            Ok((message, timings)) => {
                let mut response = Response::new(message);
                let md = response.metadata_mut();
                put(md, "x-request-id", id);
                put(md, "x-total-time", &ms(total));
                if let Some(t) = timings {
                    t.record(model);
                    put(md, "x-tokenization-time", &ms(t.tokenize));
                    put(md, "x-queue-time", &ms(t.queue));
                    put(md, "x-launch-time", &ms(t.launch));
                    put(md, "x-inference-time", &ms(t.inference));
                    put(md, "x-serialization-time", &ms(t.serialize));
                    tracing::debug!(rpc, model, request_id = id, total_ms = %ms(total), tokenize_ms = %ms(t.tokenize),
                        queue_ms = %ms(t.queue), launch_ms = %ms(t.launch), inference_ms = %ms(t.inference), "ok");
                } else {
                    tracing::debug!(rpc, model, request_id = id, total_ms = %ms(total), "ok");
                }
                Ok(response)
            }
            Err(mut status) => {
                // The service's own failures are worth a warning; refusals (bad input, overload,
                // not ready) are the client's business and could flood the log under load.
                let code_name = metrics::code_name(status.code());
                if matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss) {
                    tracing::warn!(rpc, model, request_id = id, code = code_name, total_ms = %ms(total), message = status.message(), "failed");
                } else {
                    tracing::debug!(rpc, model, request_id = id, code = code_name, total_ms = %ms(total), message = status.message(), "refused");
                }
                put(status.metadata_mut(), "x-request-id", id);
                Err(status)
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let total = self.started.elapsed();
        let expired = self.scope.as_ref().and_then(|s| s.deadline).is_some_and(|d| Instant::now() >= d);
        let (code, why) = if expired { (tonic::Code::DeadlineExceeded, "cut by its deadline") } else { (tonic::Code::Cancelled, "cancelled by the client") };
        metrics::record_request(self.rpc, &self.model, code, total);
        tracing::debug!(rpc = self.rpc, model = %self.model, request_id = %self.id, total_ms = %ms(total), "{why}");
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn put(md: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = MetadataValue::try_from(value) {
        md.insert(key, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_come_from_the_metadata_then_the_message_else_are_made_up() {
        let mut req = Request::new(());
        assert_eq!(request_id(&req, "from-message"), "from-message");
        req.metadata_mut().insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&req, "from-message"), "abc-123");
        let plain = Request::new(());
        let (a, b) = (request_id(&plain, ""), request_id(&plain, " "));
        assert!(!a.is_empty() && a != b, "{a} {b}");
        assert_ne!(request_id(&plain, &"x".repeat(200)), "x".repeat(200));
    }

    fn call(id: &str) -> Call {
        Call::start("Embed", "m".into(), id.into())
    }

    #[test]
    fn a_failure_keeps_its_status_and_carries_the_request_id() {
        let r: Result<Response<()>, Status> = call("id-1").finish(Err(Status::invalid_argument("bad")));
        let status = r.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.metadata().get("x-request-id").unwrap(), "id-1");
        let t = Timings { tokenize: Duration::from_micros(1500), ..Default::default() };
        let ok = call("id-2").finish(Ok(((), Some(t)))).unwrap();
        assert_eq!(ok.metadata().get("x-tokenization-time").unwrap(), "1.500");
        assert_eq!(ok.metadata().get("x-request-id").unwrap(), "id-2");
    }

    #[test]
    fn an_answer_over_the_message_limit_of_its_scope_is_resource_exhausted_naming_the_limit() {
        let answer = crate::grpc::pb::TokenizeResponse { ids: vec![1; 100], ..Default::default() };
        let scope = Scope::new(None, 64);
        let status = scope.around_sync(|| call("id-3").finish(Ok((answer.clone(), None)))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("response is too large") && status.message().contains("64 bytes"), "{}", status.message());
        assert!(scope.recorded());
        // Outside any scope (and within one that allows it) the answer goes out.
        assert!(call("id-4").finish(Ok((answer.clone(), None))).is_ok());
        assert!(Scope::new(None, 1 << 20).around_sync(|| call("id-5").finish(Ok((answer, None)))).is_ok());
    }
}
