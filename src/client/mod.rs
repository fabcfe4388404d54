//! The Rust client for vector stores: typed calls, retries, deadlines, API key and TLS, bulk
//! ingest in bounded requests, balancing across several endpoints.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mlx_embed::client::ClientError> {
//! use mlx_embed::client::Client;
//! let client = Client::builder()
//!     .endpoint("http://embed-0.internal:50051")
//!     .endpoint("http://embed-1.internal:50051")
//!     .api_key("secret")
//!     .build()
//!     .await?;
//! let query = client.embed_query("qwen3-embedding-0.6b", "what is a vector database?").await?;
//! let docs = client.embed_documents("qwen3-embedding-0.6b", &["first text", "second text"]).await?;
//! # let _ = (query, docs); Ok(()) }
//! ```
//!
//! Every call carries a deadline (`timeout`, 30 s by default) that covers all its attempts and
//! waits; bulk calls (`embed_texts`, `embed_documents`, `ingest`) apply it to each of their
//! requests. Vectors travel packed (little-endian f32 bytes), so they arrive bit for bit as the server
//! computed them.

mod ingest;
mod pool;
mod retry;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

pub use ingest::IngestError;
pub use pool::{EndpointStats, Resolve, SystemResolver};
pub use retry::RetryPolicy;

use crate::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient};
pub use pb::{InputType, Truncation};

/// What can go wrong on the client's side of a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client was set up wrongly (a bad endpoint URI, an API key that is not a header value).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// No endpoint could be resolved to an address.
    #[error("no endpoint address: {0}")]
    NoEndpoints(String),
    /// The call failed with this status (after the retries the policy allows).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
    /// The server's answer does not fit the request (wrong count or vector size).
    #[error("malformed response: {0}")]
    Response(String),
    /// Texts `items` (positions in the caller's input) were sent in one request, which failed.
    /// Field paths in the status (`items[i].text`) count from `items.start`.
    #[error("texts {}..{}: {source}", .items.start, .items.end)]
    Items { items: Range<usize>, source: Box<ClientError> },
}

impl ClientError {
    /// The gRPC status code behind the error, if a server or the transport gave one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            ClientError::Items { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// TLS towards the endpoints: the CA to trust (the system's roots otherwise), a client
/// certificate for mutual TLS, and the server name to verify (each target's host otherwise).
#[derive(Clone, Debug, Default)]
pub struct Tls {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl Tls {
    pub fn new() -> Tls {
        Tls::default()
    }

    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Tls {
        self.ca_pem = Some(pem.into());
        self
    }

    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Tls {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    pub fn domain_name(mut self, name: impl Into<String>) -> Tls {
        self.domain = Some(name.into());
        self
    }
}

/// How texts are embedded; the defaults are the model's (prompt, dimensions, normalization,
/// truncation as configured on the server).
#[derive(Clone, Debug, Default)]
pub struct EmbedOptions {
    pub input_type: InputType,
    /// A prompt of the model by name (`query`, `document`, ...), instead of `input_type`'s.
    pub prompt_name: Option<String>,
    /// A task instruction, for models whose query prompt takes one.
    pub instruction: Option<String>,
    /// A shorter size (Matryoshka), among the model's allowed dimensions.
    pub dimensions: Option<u32>,
    pub normalize: Option<bool>,
    pub truncation: Option<Truncation>,
}

impl EmbedOptions {
    pub fn query() -> EmbedOptions {
        EmbedOptions { input_type: InputType::Query, ..EmbedOptions::default() }
    }

    pub fn document() -> EmbedOptions {
        EmbedOptions { input_type: InputType::Document, ..EmbedOptions::default() }
    }

    /// A request for `model` with these options and no items yet.
    fn request(&self, model: &str) -> pb::EmbedRequest {
        pb::EmbedRequest {
            model: model.to_owned(),
            items: Vec::new(),
            input_type: self.input_type as i32,
            prompt_name: self.prompt_name.clone().unwrap_or_default(),
            instruction: self.instruction.clone().unwrap_or_default(),
            dimensions: self.dimensions,
            normalize: self.normalize,
            truncation: self.truncation.unwrap_or(Truncation::Unspecified) as i32,
            encoding: pb::Encoding::PackedF32Le as i32,
            request_id: String::new(),
        }
    }
}

/// One embedded text.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    pub vector: Vec<f32>,
    /// Tokens the model saw (prompt and special tokens included).
    pub tokens: u32,
    /// Whether the text was cut to the model's token limit.
    pub truncated: bool,
}

/// Settings of a [`Client`]; see each method for its default.
pub struct ClientBuilder {
    endpoints: Vec<String>,
    api_key: Option<String>,
    tls: Option<Tls>,
    timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    batch_items: usize,
    batch_bytes: usize,
    linger: Duration,
    concurrency: usize,
    resolve_interval: Duration,
    resolver: Arc<dyn Resolve>,
    max_message_bytes: usize,
}

impl ClientBuilder {
    /// Adds a target: `http://host:port`, `https://host:port`, or `host:port`. With [`Self::tls`]
    /// set, every target uses TLS, `http://` ones included. A host name stands for all its
    /// addresses (e.g. a Kubernetes headless Service).
    pub fn endpoint(mut self, target: impl Into<String>) -> Self {
        self.endpoints.push(target.into());
        self
    }

    pub fn endpoints<S: Into<String>>(mut self, targets: impl IntoIterator<Item = S>) -> Self {
        self.endpoints.extend(targets.into_iter().map(Into::into));
        self
    }

    /// Sent as `authorization: Bearer <key>` with every call.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// TLS for every target (also implied per target by an `https://` URI, then with the system's
    /// roots).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Deadline of each call, all attempts and waits included (default 30 s). Bulk calls apply it
    /// to each of their requests.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long opening a connection may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Bulk calls send at most this many texts per request (default 64; keep it at or below
    /// the server's `limits.max_items_per_request`).
    pub fn batch_items(mut self, items: usize) -> Self {
        self.batch_items = items.max(1);
        self
    }

    /// ... and at most about this many bytes of text per request (default 1 MiB; a longer single
    /// text goes alone).
    pub fn batch_bytes(mut self, bytes: usize) -> Self {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// How long a streaming ingest waits for more input before sending a request that is not full
    /// (default 20 ms).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Requests a bulk call keeps in flight at once (default 8).
    pub fn concurrency(mut self, requests: usize) -> Self {
        self.concurrency = requests.max(1);
        self
    }

    /// How often host names are resolved again (default 30 s).
    pub fn resolve_interval(mut self, interval: Duration) -> Self {
        self.resolve_interval = interval;
        self
    }

    /// Replaces the system resolver.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    /// Largest message sent or accepted (default 64 MiB).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Resolves the endpoints (connections open on first use). Fails if no target gives an
    /// address or a setting is invalid.
    pub async fn build(self) -> Result<Client, ClientError> {
        let api_key = match &self.api_key {
            Some(key) => Some(
                MetadataValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| ClientError::Config("the API key is not a valid header value".into()))?,
            ),
            None => None,
        };
        if self.timeout.is_zero() {
            return Err(ClientError::Config("timeout must be above zero".into()));
        }
        if self.resolve_interval.is_zero() {
            return Err(ClientError::Config("resolve_interval must be above zero".into()));
        }
        let settings = pool::ChannelSettings { connect_timeout: self.connect_timeout, tls: self.tls };
        let pool = pool::Pool::new(&self.endpoints, settings, self.resolver, self.resolve_interval).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                pool,
                api_key,
                timeout: self.timeout,
                retry: self.retry,
                jitter: retry::Jitter::new(),
                batch_items: self.batch_items,
                batch_bytes: self.batch_bytes,
                linger: self.linger,
                concurrency: self.concurrency,
                max_message_bytes: self.max_message_bytes,
            }),
        })
    }
}

/// A client of one embedding fleet. Cheap to clone; clones share connections and records.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<pool::Pool>,
    api_key: Option<AsciiMetadataValue>,
    timeout: Duration,
    retry: RetryPolicy,
    jitter: retry::Jitter,
    batch_items: usize,
    batch_bytes: usize,
    linger: Duration,
    concurrency: usize,
    max_message_bytes: usize,
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            endpoints: Vec::new(),
            api_key: None,
            tls: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            batch_items: 64,
            batch_bytes: 1 << 20,
            linger: Duration::from_millis(20),
            concurrency: 8,
            resolve_interval: Duration::from_secs(30),
            resolver: Arc::new(SystemResolver),
            max_message_bytes: 64 << 20,
        }
    }

    /// A client of one target with the default settings.
    pub async fn connect(target: impl Into<String>) -> Result<Client, ClientError> {
        Client::builder().endpoint(target).build().await
    }

    /// The vector of one search query (the model's query prompt applies).
    pub async fn embed_query(&self, model: &str, query: &str) -> Result<Vec<f32>, ClientError> {
        let mut out = self.embed_texts(model, &[query], &EmbedOptions::query()).await?;
        Ok(out.pop().expect("one text in, one vector out (checked in decode)").vector)
    }

    /// The vectors of documents to store, in order (the model's document prompt applies). Large
    /// inputs go out as several bounded requests, concurrently.
    pub async fn embed_documents<S: AsRef<str>>(&self, model: &str, texts: &[S]) -> Result<Vec<Vec<f32>>, ClientError> {
        let out = self.embed_texts(model, texts, &EmbedOptions::document()).await?;
        Ok(out.into_iter().map(|e| e.vector).collect())
    }

    /// Embeds `texts` in order with `options`, split into requests of at most `batch_items`
    /// texts and about `batch_bytes` bytes, `concurrency` of them in flight.
    pub async fn embed_texts<S: AsRef<str>>(
        &self,
        model: &str,
        texts: &[S],
        options: &EmbedOptions,
    ) -> Result<Vec<Embedded>, ClientError> {
        let template = options.request(model);
        let ranges = ingest::split(texts.iter().map(|t| t.as_ref().len()), self.inner.batch_items, self.inner.batch_bytes);
        let single = ranges.len() == 1;
        // The first request that fails for good ends the call (the others are dropped).
        let parts: Vec<Vec<Embedded>> = stream::iter(ranges)
            .map(|range| {
                let request = with_texts(&template, texts[range.clone()].iter().map(|t| t.as_ref()));
                async move {
                    let n = range.len();
                    let result = self.embed(request).await.and_then(|response| decode(response, n));
                    result.map_err(|e| if single { e } else { ClientError::Items { items: range, source: Box::new(e) } })
                }
            })
            .buffered(self.inner.concurrency)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// One `Embed` call as the protocol has it, with balancing, retries and the deadline.
    pub async fn embed(&self, request: pb::EmbedRequest) -> Result<pb::EmbedResponse, ClientError> {
        self.unary(request, |mut client, request| async move { client.embed(request).await }).await
    }

    /// The models the fleet serves (as one endpoint reports them).
    pub async fn list_models(&self) -> Result<Vec<pb::Model>, ClientError> {
        let response = self
            .unary(pb::ListModelsRequest {}, |mut client, request| async move { client.list_models(request).await })
            .await?;
        Ok(response.models)
    }

    pub async fn model(&self, name: &str) -> Result<pb::Model, ClientError> {
        let request = pb::GetModelRequest { model: name.to_owned() };
        self.unary(request, |mut client, request| async move { client.get_model(request).await }).await
    }

    /// What the client knows about each endpoint address.
    pub fn endpoints(&self) -> Vec<EndpointStats> {
        self.inner.pool.stats()
    }

    /// Runs one unary call: picks an endpoint, sends with the time left as the call's deadline,
    /// and on a retriable failure waits as the policy and the server say and tries again,
    /// elsewhere when it can, until the attempts or the deadline run out.
    async fn unary<Req, Resp, F, Fut>(&self, message: Req, rpc: F) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(EmbeddingServiceClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.timeout;
        let mut last_member = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = inner.pool.pick(last_member.as_ref()).ok_or_else(|| ClientError::NoEndpoints("the pool is empty".into()))?;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut request = Request::new(message.clone());
            request.set_timeout(left);
            if let Some(key) = &inner.api_key {
                request.metadata_mut().insert("authorization", key.clone());
            }
            let client = EmbeddingServiceClient::new(lease.0.channel.clone())
                .max_decoding_message_size(inner.max_message_bytes)
                .max_encoding_message_size(inner.max_message_bytes);
            let status = match tokio::time::timeout_at(deadline, rpc(client, request)).await {
                Ok(Ok(response)) => {
                    lease.0.succeeded();
                    return Ok(response.into_inner());
                }
                // Out of time (tonic's own timer on the deadline sent may answer first): the
                // endpoint is not to blame.
                Ok(Err(status)) if Instant::now() >= deadline => return Err(deadline_passed(inner.timeout, attempt, Some(&status))),
                Ok(Err(status)) => status,
                Err(_) => return Err(deadline_passed(inner.timeout, attempt, None)),
            };
            let retry::Verdict::Retry { after, endpoint_fault } = retry::classify(&status) else {
                // The endpoint answered: it is up, whatever it thought of the request.
                lease.0.succeeded();
                return Err(status.into());
            };
            if endpoint_fault {
                lease.0.failed();
                tracing::debug!(endpoint = %lease.0.addr, code = ?status.code(), message = status.message(), "embedding endpoint failed; retrying elsewhere");
            }
            if attempt >= inner.retry.max_attempts {
                return Err(status.into());
            }
            // Another endpoint in service takes a failed-over call at once; otherwise wait.
            let failover = endpoint_fault && after.is_none() && inner.pool.another_in_service(&lease.0);
            let wait = if failover { Duration::ZERO } else { inner.retry.wait(attempt, after, &inner.jitter) };
            if wait >= deadline.saturating_duration_since(Instant::now()) {
                return Err(deadline_passed(inner.timeout, attempt, Some(&status)));
            }
            last_member = Some(lease.0.clone());
            drop(lease);
            tokio::time::sleep(wait).await;
        }
    }
}

fn deadline_passed(timeout: Duration, attempts: u32, last: Option<&Status>) -> ClientError {
    let last = last.map(|s| format!("; last answer {:?}: {}", s.code(), s.message())).unwrap_or_default();
    Status::deadline_exceeded(format!("no answer within the call's deadline of {timeout:?} ({attempts} attempts{last})")).into()
}

fn with_texts<'a>(template: &pb::EmbedRequest, texts: impl Iterator<Item = &'a str>) -> pb::EmbedRequest {
    let mut request = template.clone();
    request.items = texts.map(|t| pb::Item { input: Some(pb::item::Input::Text(t.to_owned())) }).collect();
    request
}

/// The response's vectors, checked against the request: one per text, all of the stated size.
fn decode(response: pb::EmbedResponse, texts: usize) -> Result<Vec<Embedded>, ClientError> {
    if response.embeddings.len() != texts {
        return Err(ClientError::Response(format!("{} embeddings for {texts} texts", response.embeddings.len())));
    }
    let dims = response.dimensions as usize;
    response
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let vector: Vec<f32> = if e.packed.is_empty() {
                e.values
            } else {
                e.packed.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            };
            if vector.len() != dims || (!e.packed.is_empty() && e.packed.len() != dims * 4) {
                return Err(ClientError::Response(format!("embedding {i} has {} values, not {dims}", vector.len())));
            }
            Ok(Embedded { vector, tokens: e.token_count, truncated: e.truncated })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(dims: u32, packed: Vec<Vec<u8>>) -> pb::EmbedResponse {
        pb::EmbedResponse {
            dimensions: dims,
            embeddings: packed.into_iter().map(|p| pb::Embedding { packed: p.into(), token_count: 3, ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn packed_vectors_decode_bit_for_bit() {
        let values = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e-39];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = decode(response(4, vec![bytes]), 1).unwrap();
        let bits: Vec<u32> = out[0].vector.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(out[0].tokens, 3);
    }

    #[test]
    fn a_response_that_does_not_fit_the_request_is_refused() {
        assert!(matches!(decode(response(2, vec![vec![0; 8]]), 2), Err(ClientError::Response(_))));
        assert!(matches!(decode(response(2, vec![vec![0; 12]]), 1), Err(ClientError::Response(_))));
        assert!(matches!(decode(response(2, vec![vec![0; 7]]), 1), Err(ClientError::Response(_))));
    }

    #[test]
    fn options_fill_the_request_and_ask_for_packed_vectors() {
        let options = EmbedOptions { dimensions: Some(256), prompt_name: Some("query".into()), ..EmbedOptions::document() };
        let request = with_texts(&options.request("m"), ["a", "b"].into_iter());
        assert_eq!(request.model, "m");
        assert_eq!(request.items.len(), 2);
        assert_eq!(request.input_type, InputType::Document as i32);
        assert_eq!((request.dimensions, request.prompt_name.as_str()), (Some(256), "query"));
        assert_eq!(request.encoding, pb::Encoding::PackedF32Le as i32);
    }
}
