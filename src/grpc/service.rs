//! The `embedding.v1.EmbeddingService` handlers: validate → convert → tokenize (off the async
//! threads) → engine → assemble in item order.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use crate::config::{Config, ModelConfig};
use crate::engine::{EngineHandle, ModelStatus};
use crate::error::{Error, Result};
use crate::grpc::convert;
use crate::grpc::observe::{self, Timings};
use crate::grpc::pb::{self, embedding_service_server::EmbeddingService};
use crate::models::Preprocessor;
use crate::registry::Origin;
use crate::tokenize::Truncation;

/// Requests of one `EmbedStream` processed at the same time (answers stay in order).
const STREAM_PIPELINE: usize = 8;

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    engine: EngineHandle,
    models: Vec<ModelConfig>,
    /// Where each model comes from, and the folder and commit it loaded.
    origins: Vec<Origin>,
    max_items: usize,
    /// Longest a request may take when the client sets no (or a longer) deadline.
    request_timeout: std::time::Duration,
    /// Requests in progress; beyond `max_concurrent_requests` requests are refused. A permit
    /// moves into the tokenization task, which cannot be cancelled, so abandoned requests still
    /// count until their CPU work ends.
    permits: Arc<Semaphore>,
}

impl Service {
    pub fn new(engine: EngineHandle, config: &Config, origins: Vec<Origin>) -> Service {
        Service {
            inner: Arc::new(Inner {
                engine,
                models: config.models.clone(),
                origins,
                max_items: config.limits.max_items_per_request,
                request_timeout: config.limits.request_timeout,
                permits: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
            }),
        }
    }
}

impl Inner {
    /// The index and text side of a model that can serve now.
    fn ready(&self, name: &str) -> Result<(usize, Arc<Preprocessor>)> {
        if name.is_empty() {
            return Err(Error::invalid("model", "required"));
        }
        let idx = self.engine.model_index(name).ok_or_else(|| {
            let known: Vec<&str> = self.engine.model_names().collect();
            Error::NotFound(format!("no model named `{name}` (available: {})", known.join(", ")))
        })?;
        match self.engine.status(idx) {
            ModelStatus::Ready(pre) => Ok((idx, pre)),
            ModelStatus::Downloading(None) => Err(Error::Unavailable(format!("model `{name}` is still downloading"))),
            ModelStatus::Downloading(Some(why)) => Err(Error::Unavailable(format!("model `{name}` is not downloaded yet: {why}"))),
            ModelStatus::Loading => Err(Error::Unavailable(format!("model `{name}` is still loading"))),
            ModelStatus::Failed(why) => Err(Error::Unavailable(format!("model `{name}` failed to load: {why}"))),
        }
    }

    /// The prompt text and truncation a request selects (Embed and Tokenize share the options).
    fn text_options(&self, pre: &Preprocessor, cfg: &ModelConfig, input_type: i32, prompt_name: &str, instruction: &str, truncation: i32) -> Result<(String, Truncation)> {
        let choice = convert::prompt_choice(input_type, prompt_name, instruction, &pre.info, cfg)?;
        Ok((pre.prompt(&choice)?, convert::truncation(truncation, cfg)?))
    }

    fn permit(&self) -> Result<Admitted> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().map_err(|_| Error::Overloaded("too many requests in progress".into()))?;
        ::metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
        Ok(Admitted(permit))
    }

    /// Starts observing an RPC for `model` (labelled `unknown` when the config has no such model,
    /// so labels stay bounded whatever clients send).
    fn call<T>(&self, rpc: &'static str, req: &Request<T>, model: &str, request_id: &str) -> observe::Call {
        let label = if model.is_empty() || self.engine.model_index(model).is_some() { model.to_string() } else { "unknown".to_string() };
        observe::Call::start(rpc, label, observe::request_id(req, request_id))
    }

    /// Runs `work` within the client's deadline (`grpc-timeout`), capped by `request_timeout`.
    async fn within_deadline<T>(&self, grpc_timeout: Option<&str>, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let deadline = grpc_timeout.and_then(convert::grpc_timeout).map_or(self.request_timeout, |d| d.min(self.request_timeout));
        tokio::time::timeout(deadline, work).await.unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded(format!("the deadline ({deadline:?}) passed before the answer was ready")))
        })
    }

    async fn embed(&self, req: pb::EmbedRequest) -> Result<(pb::EmbedResponse, Timings)> {
        let permit = self.permit()?;
        let (idx, pre) = self.ready(&req.model)?;
        let cfg = &self.models[idx];
        let info = &pre.info;
        if req.items.is_empty() {
            return Err(Error::invalid("items", "at least one item is needed"));
        }
        if req.items.len() > self.max_items {
            return Err(Error::invalid("items", format!("{} items exceed the limit of {}", req.items.len(), self.max_items)));
        }
        let (prompt, truncation) = self.text_options(&pre, cfg, req.input_type, &req.prompt_name, &req.instruction, req.truncation)?;
        let encoding = pb::Encoding::try_from(req.encoding)
            .map_err(|_| Error::invalid("encoding", format!("unknown value {}", req.encoding)))?;
        let dims = convert::dimensions(req.dimensions, info, cfg)?;
        let normalize = req.normalize.unwrap_or(info.normalize);
        let full = info.dimensions as usize;

        // Split the items: texts go to the model, vectors are checked here.
        let mut texts = Vec::new();
        let mut out: Vec<Option<pb::Embedding>> = vec![None; req.items.len()];
        for (i, item) in req.items.into_iter().enumerate() {
            match item.input {
                Some(pb::item::Input::Text(t)) if t.is_empty() => return Err(Error::invalid(format!("items[{i}].text"), "empty text")),
                Some(pb::item::Input::Text(t)) => texts.push((i, t)),
                Some(pb::item::Input::Vector(v)) => {
                    let v = convert::user_vector(i, v.values, full, dims, normalize)?;
                    out[i] = Some(convert::encode(v, encoding, 0, false));
                }
                None => return Err(Error::invalid(format!("items[{i}]"), "set either text or vector")),
            }
        }
        let n_vectors = out.iter().filter(|o| o.is_some()).count();

        // Tokenize on the blocking pool: it is CPU work and must not stall the async threads.
        let mut timings = Timings { texts: texts.len(), ..Timings::default() };
        let tokenizing = Instant::now();
        let max_tokens = cfg.max_tokens;
        let pre2 = Arc::clone(&pre);
        let (texts, encoded, _permit) = tokio::task::spawn_blocking(move || {
            let enc = texts.iter().map(|(i, t)| {
                pre2.tokenize(&prompt, t, max_tokens, truncation).map_err(|e| match e {
                    Error::InvalidArgument { message, .. } => Error::invalid(format!("items[{i}].text"), message),
                    other => other,
                })
            }).collect::<Result<Vec<_>>>();
            (texts, enc, permit)
        }).await.map_err(|e| Error::Internal(format!("tokenization task failed: {e}")))?;
        let encoded = encoded?;
        timings.tokenize = tokenizing.elapsed();

        let total_tokens: u64 = encoded.iter().map(|e| e.ids.len() as u64).sum();
        let meta: Vec<(u32, bool)> = encoded.iter().map(|e| (e.ids.len() as u32, e.truncated)).collect();
        let embedded = self.engine.embed_timed(idx, encoded.into_iter().map(|e| e.ids).collect()).await?;
        (timings.queue, timings.inference) = (embedded.queue, embedded.inference);
        let serializing = Instant::now();
        for (((i, _), v), (count, truncated)) in texts.iter().zip(embedded.vectors).zip(meta) {
            out[*i] = Some(convert::encode(crate::models::finish(v, dims, normalize), encoding, count, truncated));
        }
        let response = pb::EmbedResponse {
            model: cfg.name.clone(),
            dimensions: dims as u32,
            embeddings: out.into_iter().map(|e| e.expect("every item answered")).collect(),
            usage: Some(pb::Usage { total_tokens }),
            request_id: req.request_id,
        };
        timings.serialize = serializing.elapsed();
        ::metrics::counter!(crate::metrics::ITEMS, "model" => cfg.name.clone(), "kind" => "vector").increment(n_vectors as u64);
        ::metrics::counter!(crate::metrics::ITEMS, "model" => cfg.name.clone(), "kind" => "text").increment(texts.len() as u64);
        Ok((response, timings))
    }

    async fn tokenize(&self, req: pb::TokenizeRequest) -> Result<pb::TokenizeResponse> {
        let permit = self.permit()?;
        let (idx, pre) = self.ready(&req.model)?;
        let cfg = &self.models[idx];
        let (prompt, truncation) = self.text_options(&pre, cfg, req.input_type, &req.prompt_name, &req.instruction, req.truncation)?;
        let max_tokens = cfg.max_tokens;
        let enc = tokio::task::spawn_blocking(move || {
            let enc = pre.tokenize(&prompt, &req.text, max_tokens, truncation).map(|e| (e, prompt));
            drop(permit);
            enc
        })
        .await
        .map_err(|e| Error::Internal(format!("tokenization task failed: {e}")))?;
        let (enc, prompt) = enc?;
        Ok(pb::TokenizeResponse { count: enc.ids.len() as u32, ids: enc.ids, truncated: enc.truncated, prompt })
    }

    fn describe(&self, idx: usize) -> pb::Model {
        let cfg = &self.models[idx];
        let origin = &self.origins[idx];
        let mut m = pb::Model { name: cfg.name.clone(), source: origin.source.clone(), ..Default::default() };
        if let Some(found) = origin.resolved.get() {
            m.revision = found.commit.clone().unwrap_or_default();
            m.path = found.dir.display().to_string();
        }
        match self.engine.status(idx) {
            ModelStatus::Downloading(note) => {
                m.state = pb::ModelState::Downloading as i32;
                m.error = note.unwrap_or_default();
            }
            ModelStatus::Loading => m.state = pb::ModelState::Loading as i32,
            ModelStatus::Failed(why) => {
                m.state = pb::ModelState::Failed as i32;
                m.error = why;
            }
            ModelStatus::Ready(pre) => {
                let info = &pre.info;
                m.state = pb::ModelState::Ready as i32;
                m.loaded = true;
                m.architecture = info.architecture.model_type().into();
                m.dimensions = info.dimensions as u32;
                m.allowed_dimensions = convert::allowed_dimensions(info, cfg);
                m.max_tokens = cfg.max_tokens.unwrap_or(info.max_tokens).min(info.max_tokens) as u32;
                m.pooling = info.pooling.name().into();
                m.normalize = info.normalize;
                m.dtype = info.dtype.name().into();
                m.device = if info.gpu { "gpu" } else { "cpu" }.into();
                m.prompts = info.prompts.clone().into_iter().collect();
                m.default_prompt = cfg.default_prompt.clone().or_else(|| info.default_prompt.clone()).unwrap_or_default();
                m.quantization = info.quantization.map(|q| pb::Quantization { bits: q.bits as u32, group_size: q.group_size as u32 });
            }
        }
        m
    }
}

/// An admitted request; counted in the in-flight gauge until dropped.
struct Admitted(#[allow(dead_code)] OwnedSemaphorePermit);

impl Drop for Admitted {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EmbeddingService for Service {
    async fn embed(&self, req: Request<pb::EmbedRequest>) -> std::result::Result<Response<pb::EmbedResponse>, Status> {
        let call = self.inner.call("Embed", &req, &req.get_ref().model, &req.get_ref().request_id);
        // When the deadline passes the work is dropped: the engine skips texts whose caller has gone.
        let timeout = grpc_timeout(&req);
        let work = self.inner.embed(req.into_inner());
        let result = self.inner.within_deadline(timeout.as_deref(), work).await;
        call.finish(result.map(|(r, t)| (r, Some(t))).map_err(Status::from))
    }

    type EmbedStreamStream = ResponseStream;

    async fn embed_stream(&self, req: Request<Streaming<pb::EmbedRequest>>) -> std::result::Result<Response<ResponseStream>, Status> {
        let inner = Arc::clone(&self.inner);
        let answers = req.into_inner()
            .map(move |r| {
                let inner = Arc::clone(&inner);
                async move {
                    let r = r?;
                    let call = inner.call("EmbedStream", &Request::new(()), &r.model, &r.request_id);
                    let result = inner.within_deadline(None, inner.embed(r)).await;
                    call.finish(result.map(|(r, t)| (r, Some(t))).map_err(Status::from)).map(Response::into_inner)
                }
            })
            .buffered(STREAM_PIPELINE);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn list_models(&self, req: Request<pb::ListModelsRequest>) -> std::result::Result<Response<pb::ListModelsResponse>, Status> {
        let call = self.inner.call("ListModels", &req, "", "");
        let models = (0..self.inner.models.len()).map(|i| self.inner.describe(i)).collect();
        call.finish(Ok((pb::ListModelsResponse { models }, None)))
    }

    async fn get_model(&self, req: Request<pb::GetModelRequest>) -> std::result::Result<Response<pb::Model>, Status> {
        let call = self.inner.call("GetModel", &req, &req.get_ref().model, "");
        let name = req.into_inner().model;
        let result = self.inner.engine.model_index(&name)
            .map(|idx| (self.inner.describe(idx), None))
            .ok_or_else(|| Status::from(Error::NotFound(format!("no model named `{name}`"))));
        call.finish(result)
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> std::result::Result<Response<pb::TokenizeResponse>, Status> {
        let call = self.inner.call("Tokenize", &req, &req.get_ref().model, "");
        let timeout = grpc_timeout(&req);
        let work = self.inner.tokenize(req.into_inner());
        let result = self.inner.within_deadline(timeout.as_deref(), work).await;
        call.finish(result.map(|r| (r, None)).map_err(Status::from))
    }
}

fn grpc_timeout<T>(req: &Request<T>) -> Option<String> {
    req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(str::to_string)
}
