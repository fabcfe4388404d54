//! Admission: a tower layer in front of the embedding service.
//!
//! - At most `max_concurrent_requests` Embed, Tokenize and EmbedStream calls run at once (a stream
//!   counts as one for as long as it is open). Beyond that a call is answered RESOURCE_EXHAUSTED at
//!   once, with a google.rpc.RetryInfo; nothing waits in an unbounded queue. (Each model's engine
//!   queue is bounded too: `batching.max_queue`.) A call holds its place until its response body
//!   is sent or dropped, so a client that disconnects frees it.
//! - Once a shutdown has begun ([`Drain`]), new calls to the embedding service get UNAVAILABLE;
//!   health and reflection still answer (health says NOT_SERVING).
//! - The time a call arrived is put into its extensions ([`Arrived`]), so the handlers measure the
//!   client's deadline from there.
//! - The deadline (the client's `grpc-timeout`, capped by `request_timeout`) also covers the wait
//!   for the request's message: a call whose deadline passes before its handler answers gets
//!   DEADLINE_EXCEEDED from here. tonic's own `grpc-timeout` timer would answer CANCELLED
//!   "Timeout expired", unrecorded; it starts after this layer's `call` (tonic builds its timer
//!   after calling the service), and a poll finds this layer's deadline passed whenever tonic's
//!   has, so this answer always comes first.
//! - Calls answered before a handler ran (refused here, refused by tonic while reading the message,
//!   or cut by their deadline first), and stream messages refused as they were read, are recorded
//!   here ([`observe::unhandled`]); the handlers record the rest. A message over
//!   `max_message_bytes` is answered RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE; answers over it
//!   are refused by the handler's [`observe::Call`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::config::Limits;
use crate::error::Error;
use crate::grpc::observe::{self, Scope};

const SERVICE_PREFIX: &str = "/embedding.v1.EmbeddingService/";
/// The service's methods (the `rpc` label of the metrics).
const RPCS: [&str; 5] = ["Embed", "EmbedStream", "Tokenize", "ListModels", "GetModel"];
/// The calls that do work (and so need a place); ListModels and GetModel only read state.
const ADMITTED: [&str; 3] = ["Embed", "Tokenize", "EmbedStream"];

/// Set once a shutdown has begun; shared by the layer, the stream handler and health.
#[derive(Clone, Default)]
pub struct Drain(Arc<AtomicBool>);

impl Drain {
    pub fn start(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn refusal() -> Error {
        Error::Unavailable("the server is shutting down; retry on another instance".into())
    }
}

/// When the server received a call (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

#[derive(Clone)]
pub struct Admission {
    places: Arc<Semaphore>,
    drain: Drain,
    /// Longest a call may take, whatever the client's deadline (`limits.request_timeout`).
    request_timeout: Duration,
    /// Largest message a call may answer with (`limits.max_message_bytes`).
    max_message: usize,
}

impl Admission {
    pub fn new(limits: &Limits, drain: Drain) -> Admission {
        Admission {
            places: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            drain,
            request_timeout: limits.request_timeout,
            max_message: limits.max_message_bytes,
        }
    }

    /// What to do with a call to `path`: pass it (with its place, if it needs one) or refuse it.
    fn admit(&self, path: &str) -> Result<Option<Place>, Error> {
        let Some(method) = path.strip_prefix(SERVICE_PREFIX) else { return Ok(None) };
        if self.drain.is_draining() {
            ::metrics::counter!(crate::metrics::REFUSED, "reason" => "draining").increment(1);
            return Err(Drain::refusal());
        }
        if !ADMITTED.contains(&method) {
            return Ok(None);
        }
        let permit = Arc::clone(&self.places).try_acquire_owned().map_err(|_| {
            ::metrics::counter!(crate::metrics::REFUSED, "reason" => "overloaded").increment(1);
            Error::Overloaded("too many requests in progress".into())
        })?;
        ::metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
        Ok(Some(Place(permit)))
    }
}

/// An admitted call's place; counted in the in-flight gauge until dropped.
struct Place(#[allow(dead_code)] OwnedSemaphorePermit);

impl Drop for Place {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
    }
}

impl<S> Layer<S> for Admission {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> AdmissionService<S> {
        AdmissionService { inner, admission: self.clone() }
    }
}

#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Admission,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AdmissionService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let arrived = Instant::now();
        let rpc = req.uri().path().strip_prefix(SERVICE_PREFIX).and_then(|m| RPCS.iter().find(|r| **r == m).copied());
        let place = match self.admission.admit(req.uri().path()) {
            Ok(place) => place,
            Err(refusal) => {
                let status = tonic::Status::from(refusal);
                if let Some(rpc) = rpc {
                    observe::unhandled(rpc, status.code(), arrived.elapsed());
                }
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        req.extensions_mut().insert(Arrived(arrived));
        let Some(rpc) = rpc else {
            // Health, reflection, and methods the service does not have: passed as they are.
            let answer = self.inner.call(req);
            return Box::pin(async move {
                let mut resp = answer.await?;
                status_of(resp.headers_mut());
                Ok(resp.map(|body| tonic::body::Body::new(Holding { body, _place: place, scope: None, rpc: None, arrived })))
            });
        };
        // The same deadline as the handler's (service.rs, `Deadline`): from the same arrival.
        let client = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(crate::grpc::convert::grpc_timeout);
        let timeout = client.map_or(self.admission.request_timeout, |t| t.min(self.admission.request_timeout));
        let deadline = arrived + timeout;
        let scope = Scope::new(Some(deadline), self.admission.max_message);
        let answer = scope.around(self.inner.call(req));
        // The response body (a stream's answers) makes its own calls, each with its own deadline.
        let body_scope = Scope::new(None, self.admission.max_message);
        Box::pin(async move {
            // A handler cut by the deadline is dropped in there; its Call records DEADLINE_EXCEEDED.
            let answered = before(deadline, answer).await;
            let Some(resp) = answered else {
                let why = if scope.recorded() { "the answer was ready" } else { "the request had arrived in full" };
                if !scope.recorded() {
                    observe::unhandled(rpc, tonic::Code::DeadlineExceeded, arrived.elapsed());
                }
                let status = tonic::Status::from(Error::DeadlineExceeded(format!("the deadline ({timeout:?}) passed before {why}")));
                return Ok(status.into_http());
            };
            let mut resp = resp?;
            // A status in the headers without a handler's record: tonic refused the message.
            if let (Some((code, _)), false) = (status_of(resp.headers_mut()), scope.recorded()) {
                observe::unhandled(rpc, code, arrived.elapsed());
            }
            Ok(resp.map(|body| tonic::body::Body::new(Holding { body, _place: place, scope: Some(body_scope), rpc: Some(rpc), arrived })))
        })
    }
}

/// The output of `answer`, or `None` once `deadline` has passed (`answer` then dropped unfinished).
/// It reads the clock whenever it is polled, not only its timer: tonic's `grpc-timeout` timer
/// wakes the task when it fires, and this has to find the deadline passed then, before tonic does.
async fn before<F: Future>(deadline: Instant, answer: F) -> Option<F::Output> {
    let mut answer = std::pin::pin!(answer);
    let mut expiry = std::pin::pin!(tokio::time::sleep_until(deadline.into()));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if Instant::now() >= deadline || expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// The status in a response's headers or trailers, with tonic's OUT_OF_RANGE for a request over
/// the message limit turned into RESOURCE_EXHAUSTED (what gRPC's status-code guide and the other
/// implementations say, and what clients retry on); and whether it refuses a message as it was
/// read (too large, or not decodable).
fn status_of(headers: &mut http::HeaderMap) -> Option<(tonic::Code, bool)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok().map(tonic::Code::from)?;
    let says = |text: &str| {
        headers.get("grpc-message").is_some_and(|m| {
            let (m, plain, encoded) = (m.as_bytes(), text.as_bytes(), text.replace(' ', "%20"));
            m.windows(plain.len()).any(|w| w == plain) || m.windows(encoded.len()).any(|w| w == encoded.as_bytes())
        })
    };
    if code == tonic::Code::OutOfRange && says("too large") {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        return Some((tonic::Code::ResourceExhausted, true));
    }
    // Our codec's refusals start with MALFORMED; a handler's message may quote client text anywhere.
    let starts = |text: &str| {
        headers.get("grpc-message").is_some_and(|m| {
            m.as_bytes().starts_with(text.as_bytes()) || m.as_bytes().starts_with(text.replace(' ', "%20").as_bytes())
        })
    };
    Some((code, code == tonic::Code::InvalidArgument && starts(crate::grpc::codec::MALFORMED)))
}

/// A response body that keeps its call's place until it is finished or dropped, and is read
/// within its scope (a stream's answers are made as it is read). Its trailers get the code of a
/// message over the limit right, and a message the stream refused as it was read is recorded
/// there (no handler saw it).
struct Holding<B> {
    body: B,
    _place: Option<Place>,
    scope: Option<Arc<Scope>>,
    /// The method, when it is one of the service's.
    rpc: Option<&'static str>,
    arrived: Instant,
}

impl<B: http_body::Body + Unpin> http_body::Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let Holding { body, scope, rpc, arrived, .. } = &mut *self;
        let mut polled = match scope {
            Some(scope) => scope.around_sync(|| Pin::new(body).poll_frame(cx)),
            None => Pin::new(body).poll_frame(cx),
        };
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let Some((code, true)) = frame.trailers_mut().and_then(status_of) {
                if let Some(rpc) = rpc {
                    observe::unhandled(rpc, code, arrived.elapsed());
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_limited_and_given_back_and_a_drain_refuses_new_calls() {
        let admission = Admission::new(&Limits { max_concurrent_requests: 2, ..Limits::default() }, Drain::default());
        let embed = "/embedding.v1.EmbeddingService/Embed";
        let a = admission.admit(embed).unwrap().expect("a place");
        let _b = admission.admit("/embedding.v1.EmbeddingService/EmbedStream").unwrap().expect("a place");
        assert!(matches!(admission.admit(embed), Err(Error::Overloaded(_))));
        // Reading calls and other services need no place.
        assert!(admission.admit("/embedding.v1.EmbeddingService/ListModels").unwrap().is_none());
        assert!(admission.admit("/grpc.health.v1.Health/Check").unwrap().is_none());
        drop(a);
        assert!(admission.admit(embed).unwrap().is_some());

        admission.drain.start();
        assert!(matches!(admission.admit(embed), Err(Error::Unavailable(_))));
        assert!(matches!(admission.admit("/embedding.v1.EmbeddingService/ListModels"), Err(Error::Unavailable(_))));
        assert!(admission.admit("/grpc.health.v1.Health/Check").unwrap().is_none());
    }
}
