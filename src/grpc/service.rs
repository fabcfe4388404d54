//! The `embedding.v1.EmbeddingService` handlers: validate → convert → tokenize (off the async
//! threads) → engine → assemble in item order.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::config::{Config, ModelConfig};
use crate::engine::{EngineHandle, ModelStatus};
use crate::error::{Error, Result};
use crate::grpc::admission::{Arrived, Drain};
use crate::grpc::convert;
use crate::grpc::observe::{self, Timings};
use crate::grpc::pb::{self, embedding_service_server::EmbeddingService};
use crate::grpc::stream::{read_ahead, ReadAhead};
use crate::models::Preprocessor;
use crate::registry::Origin;

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
    request_timeout: Duration,
    max_text_bytes: usize,
    /// Texts per second of one EmbedStream.
    stream_rate: Option<u32>,
    stream_read_ahead: ReadAhead,
    drain: Drain,
}

impl Service {
    pub fn new(engine: EngineHandle, config: &Config, origins: Vec<Origin>, drain: Drain) -> Service {
        Service {
            inner: Arc::new(Inner {
                engine,
                models: config.models.clone(),
                origins,
                max_items: config.limits.max_items_per_request,
                request_timeout: config.limits.request_timeout,
                max_text_bytes: config.limits.max_text_bytes,
                stream_rate: config.limits.max_stream_items_per_second,
                stream_read_ahead: ReadAhead {
                    max_pending: config.limits.max_stream_pending_bytes,
                    idle_timeout: config.limits.stream_idle_timeout,
                },
                drain,
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
            Error::NotFound(format!("no model named {} (available: {})", crate::error::quote(name), known.join(", ")))
        })?;
        match self.engine.status(idx) {
            ModelStatus::Ready(pre) => Ok((idx, pre)),
            ModelStatus::Downloading(None) => Err(Error::Unavailable(format!("model `{name}` is still downloading"))),
            ModelStatus::Downloading(Some(why)) => Err(Error::Unavailable(format!("model `{name}` is not downloaded yet: {why}"))),
            ModelStatus::Loading => Err(Error::Unavailable(format!("model `{name}` is still loading"))),
            ModelStatus::Failed(why) => Err(Error::Unavailable(format!("model `{name}` failed to load: {why}"))),
        }
    }



    /// Starts observing an RPC for `model` (labelled `unknown` when the config has no such model,
    /// so labels stay bounded whatever clients send).
    fn call<T>(&self, rpc: &'static str, req: &Request<T>, model: &str, request_id: &str) -> observe::Call {
        let label = if model.is_empty() || self.engine.model_index(model).is_some() { model.to_string() } else { "unknown".to_string() };
        observe::Call::start(rpc, label, observe::request_id(req, request_id))
    }

    /// Runs `work` within the client's deadline (`grpc-timeout`, counted from when the call
    /// arrived), capped by `request_timeout`. When it passes, `work` is dropped: texts still queued
    /// never reach the model (the engine skips work whose caller has gone).
    async fn within_deadline<T>(&self, deadline: Deadline, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let timeout = deadline.timeout.map_or(self.request_timeout, |d| d.min(self.request_timeout));
        tokio::time::timeout_at((deadline.arrived + timeout).into(), work).await.unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded(format!("the deadline ({timeout:?}) passed before the answer was ready")))
        })
    }

    async fn embed(&self, mut req: pb::EmbedRequest) -> Result<(pb::EmbedResponse, Timings)> {
        let (idx, pre) = self.ready(&req.model)?;
        let cfg = &self.models[idx];
        let limits = convert::RequestLimits { max_items: self.max_items, max_text_bytes: self.max_text_bytes };
        let request_id = std::mem::take(&mut req.request_id);
        let convert::PreparedEmbed { texts, mut out, prompt, truncation, encoding, dims, normalize } = convert::prepare_embed(req, &pre, cfg, &limits)?;
        let n_vectors = out.iter().filter(|o| o.is_some()).count();

        // Tokenize on the blocking pool: it is CPU work and must not stall the async threads.
        let mut timings = Timings { texts: texts.len(), ..Timings::default() };
        let tokenizing = Instant::now();
        let max_tokens = cfg.max_tokens;
        let pre2 = Arc::clone(&pre);
        let (texts, encoded) = tokio::task::spawn_blocking(move || {
            let enc = convert::tokenize_texts(&pre2, &prompt, &texts, max_tokens, truncation);
            (texts, enc)
        }).await.map_err(|e| Error::Internal(format!("tokenization task failed: {e}")))?;
        let encoded = encoded?;
        timings.tokenize = tokenizing.elapsed();

        let total_tokens: u64 = encoded.iter().map(|e| e.ids.len() as u64).sum();
        let meta: Vec<(u32, bool)> = encoded.iter().map(|e| (e.ids.len() as u32, e.truncated)).collect();
        let embedded = self.engine.embed_timed(idx, encoded.into_iter().map(|e| e.ids).collect()).await?;
        (timings.queue, timings.launch, timings.inference) = (embedded.queue, embedded.launch, embedded.inference);
        let serializing = Instant::now();
        for (((i, _), v), (count, truncated)) in texts.iter().zip(embedded.vectors).zip(meta) {
            out[*i] = Some(convert::encode(crate::models::finish(v, dims, normalize), encoding, count, truncated));
        }
        let response = pb::EmbedResponse {
            model: cfg.name.clone(),
            dimensions: dims as u32,
            embeddings: out.into_iter().map(|e| e.expect("every item answered")).collect(),
            usage: Some(pb::Usage { total_tokens }),
            request_id,
        };
        timings.serialize = serializing.elapsed();
        ::metrics::counter!(crate::metrics::ITEMS, "model" => cfg.name.clone(), "kind" => "vector").increment(n_vectors as u64);
        ::metrics::counter!(crate::metrics::ITEMS, "model" => cfg.name.clone(), "kind" => "text").increment(texts.len() as u64);
        Ok((response, timings))
    }

    async fn tokenize(&self, req: pb::TokenizeRequest) -> Result<pb::TokenizeResponse> {
        let (idx, pre) = self.ready(&req.model)?;
        let cfg = &self.models[idx];
        convert::check_text("text", &req.text, self.max_text_bytes)?;
        convert::check_length("instruction", &req.instruction, self.max_text_bytes)?;
        let (prompt, truncation) = convert::text_options(&pre, cfg, req.input_type, &req.prompt_name, &req.instruction, req.truncation)?;
        let max_tokens = cfg.max_tokens;
        let enc = tokio::task::spawn_blocking(move || pre.tokenize(&prompt, &req.text, max_tokens, truncation).map(|e| (e, prompt)))
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

/// A call's deadline: when it arrived and the client's `grpc-timeout`, if any.
#[derive(Clone, Copy)]
struct Deadline {
    arrived: Instant,
    timeout: Option<Duration>,
}

impl Deadline {
    fn of<T>(req: &Request<T>) -> Deadline {
        Deadline {
            arrived: req.extensions().get::<Arrived>().map_or_else(Instant::now, |a| a.0),
            timeout: req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(convert::grpc_timeout),
        }
    }

    /// No client deadline: only `request_timeout`, from now.
    fn none() -> Deadline {
        Deadline { arrived: Instant::now(), timeout: None }
    }
}

/// Paces one stream's texts to `rate` per second, after a burst of one second's worth: returns
/// how long to wait before reading on after a message of `items` texts. (`next` is when the
/// stream would be back within its rate.)
fn pace(next: &mut Instant, now: Instant, items: usize, rate: u32) -> Duration {
    let cost = Duration::from_secs_f64(items as f64 / rate as f64);
    *next = (*next).max(now) + cost;
    (*next - now).saturating_sub(Duration::from_secs(1))
}

type ResponseStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EmbeddingService for Service {
    async fn embed(&self, req: Request<pb::EmbedRequest>) -> std::result::Result<Response<pb::EmbedResponse>, Status> {
        let call = self.inner.call("Embed", &req, &req.get_ref().model, &req.get_ref().request_id);
        let deadline = Deadline::of(&req);
        let work = self.inner.embed(req.into_inner());
        let result = self.inner.within_deadline(deadline, work).await;
        call.finish(result.map(|(r, t)| (r, Some(t))).map_err(Status::from))
    }

    type EmbedStreamStream = ResponseStream;

    async fn embed_stream(&self, req: Request<Streaming<pb::EmbedRequest>>) -> std::result::Result<Response<ResponseStream>, Status> {
        let inner = Arc::clone(&self.inner);
        let rate = self.inner.stream_rate;
        let mut next = Instant::now();
        let (queue, ledger) = read_ahead(req.into_inner(), self.inner.stream_read_ahead);
        let answers = queue
            // Paced after reading (reading waits for nothing: see `grpc::stream`).
            .then(move |r| {
                let wait = match (&r, rate) {
                    (Ok(q), Some(rate)) => pace(&mut next, Instant::now(), q.request.items.len(), rate),
                    _ => Duration::ZERO,
                };
                async move {
                    tokio::time::sleep(wait).await;
                    r
                }
            })
            .map(move |r| {
                let inner = Arc::clone(&inner);
                async move {
                    let q = r?;
                    let call = inner.call("EmbedStream", &Request::new(()), &q.request.model, &q.request.request_id);
                    if inner.drain.is_draining() {
                        return Err(call.refuse(Status::from(Drain::refusal())));
                    }
                    let result = inner.within_deadline(Deadline::none(), inner.embed(q.request)).await;
                    let answer = call.finish(result.map(|(r, t)| (r, Some(t))).map_err(Status::from)).map(Response::into_inner);
                    Ok((answer?, q.cost))
                }
            })
            .buffered(STREAM_PIPELINE)
            .map(move |r| r.map(|(answer, cost)| {
                ledger.answered(cost);
                answer
            }));
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
            .ok_or_else(|| Status::from(Error::NotFound(format!("no model named {}", crate::error::quote(&name)))));
        call.finish(result)
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> std::result::Result<Response<pb::TokenizeResponse>, Status> {
        let call = self.inner.call("Tokenize", &req, &req.get_ref().model, "");
        let deadline = Deadline::of(&req);
        let work = self.inner.tokenize(req.into_inner());
        let result = self.inner.within_deadline(deadline, work).await;
        call.finish(result.map(|r| (r, None)).map_err(Status::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_gets_a_burst_of_one_second_then_its_rate() {
        let t0 = Instant::now();
        let mut next = t0;
        // 100 texts/s: the first 100 pass at once, the next waits its share.
        assert_eq!(pace(&mut next, t0, 60, 100), Duration::ZERO);
        assert_eq!(pace(&mut next, t0, 40, 100), Duration::ZERO);
        let wait = pace(&mut next, t0, 50, 100);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // After a quiet spell the burst is back, never more.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(pace(&mut next, later, 100, 100), Duration::ZERO);
        assert!(pace(&mut next, later, 1, 100) > Duration::ZERO);
    }
}
