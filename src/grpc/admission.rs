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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::error::Error;

const SERVICE_PREFIX: &str = "/embedding.v1.EmbeddingService/";
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
}

impl Admission {
    pub fn new(max_concurrent: usize, drain: Drain) -> Admission {
        Admission { places: Arc::new(Semaphore::new(max_concurrent)), drain }
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
        let place = match self.admission.admit(req.uri().path()) {
            Ok(place) => place,
            Err(refusal) => {
                let status = tonic::Status::from(refusal);
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        req.extensions_mut().insert(Arrived(Instant::now()));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|body| tonic::body::Body::new(Holding { body, _place: place })))
        })
    }
}

/// A response body that keeps its call's place until it is finished or dropped.
struct Holding<B> {
    body: B,
    _place: Option<Place>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
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
        let admission = Admission::new(2, Drain::default());
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
